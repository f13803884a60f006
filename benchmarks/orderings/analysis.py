"""Judging the planners from the records: times per path, ratios to the fastest, the cost-model fit."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import tnlayers
from tnlayers import layer as kit
from tnlayers.cost import cost_model_for
from tnlayers.plan import operand_needs, plan_cost

from .cases import AUTO_CHOICES, BASELINES, PLANNERS

PathKey = tuple[tuple[int, ...], ...]

WEIGHT_ROUTE: PathKey = ()
"""The path key of every plan that ran as ``W`` built by :func:`tnlayers.contract.dense_weight` and one
product: their paths differ only in the order they multiply the cores, which that route does not follow,
so their times are repeated measurements of one computation (record field ``weight_route``)."""


def _path_key(r: dict[str, Any]) -> PathKey:
    return WEIGHT_ROUTE if r.get("weight_route") else tuple(map(tuple, r["path"]))


def path_times(
    records: Sequence[dict[str, Any]], mode: str
) -> tuple[dict[tuple[Any, ...], dict[PathKey, float]], dict[tuple[Any, ...], PathKey]]:
    """Per (backend, case, batch): each distinct path's time, the median over the contenders that ran
    it (baselines have no path; every plan that ran the ``W`` route is one path, :data:`WEIGHT_ROUTE`);
    and per (backend, case, batch, ordering) the path it ran."""
    samples: dict[tuple[Any, ...], dict[PathKey, list[float]]] = {}
    ran: dict[tuple[Any, ...], PathKey] = {}
    for r in records:
        if r["mode"] != mode or r["ordering"] in BASELINES or r.get("path") is None:
            continue
        key, path = (r["backend"], r["case"], r["batch"]), _path_key(r)
        samples.setdefault(key, {}).setdefault(path, []).append(r["median_s"])
        ran[(*key, r["ordering"])] = path
    times = {key: {path: statistics.median(t) for path, t in paths.items()} for key, paths in samples.items()}
    return times, ran


def ratio_table(records: Sequence[dict[str, Any]], mode: str = "forward+backward") -> list[dict[str, Any]]:
    """Per (backend, case, batch): the fastest ordering and each contender's time / that fastest time.

    Also ``"auto by path"`` and ``"autotune by path"``: several contenders often run the very same
    path (the same steps), so their medians are repeated measurements of one computation. Per
    distinct path the median of those medians is its time; the planner's ratio is its path's time
    over the fastest path's. The per-contender ratio takes the minimum over a dozen noisy medians as
    "the fastest", which biases it low; this one does not.
    """
    groups: dict[tuple[Any, ...], dict[str, float]] = {}
    chosen: dict[tuple[Any, ...], str] = {}
    for r in records:
        if r["mode"] != mode:
            continue
        key = (r["backend"], r["case"], r["batch"])
        groups.setdefault(key, {})[r["ordering"]] = r["median_s"]
        if r["ordering"] == "auto":
            chosen[key] = r["method"]
    path_time, ran = path_times(records, mode)
    rows = []
    for key, times in groups.items():
        orderings = {name: t for name, t in times.items() if name not in BASELINES and name not in PLANNERS}
        if not orderings:  # only the planner and the baselines ran (``--orderings auto dense``): nothing to judge by
            continue
        fastest_name = min(orderings, key=orderings.__getitem__)
        fastest = orderings[fastest_name]
        judged = {
            f"{name} by path": path_time[key][ran[(*key, name)]] / min(path_time[key].values())
            for name in PLANNERS
            if (*key, name) in ran
        }
        rows.append(
            {
                "backend": key[0],
                "case": key[1],
                "batch": key[2],
                "fastest": fastest_name,
                "fastest_ms": 1e3 * fastest,
                "auto_chose": chosen.get(key),
                **{name: t / fastest for name, t in times.items()},
                **judged,
            }
        )
    return rows


def dense_ratios(
    records: Sequence[dict[str, Any]],
    gemm_gflops: dict[str, float],
    mode: str = "forward+backward",
    contender: str = "auto",
) -> list[dict[str, Any]]:
    """Per (backend, case, batch): ``contender`` against the dense layer holding the same W, timed in the same
    round. ``x dense`` is the time ratio; ``efficiency`` is (plan flops / dense flops) / (time / dense time),
    1.0 when the MPO runs its flops at the dense product's rate; ``% of GEMM`` is the plan's achieved
    GFLOP/s over this backend's measured GEMM ceiling."""
    dense = {
        (r["backend"], r["case"], r["batch"]): r for r in records if r["mode"] == mode and r["ordering"] == "dense"
    }
    rows = []
    for r in records:
        key = (r["backend"], r["case"], r["batch"])
        if r["mode"] != mode or r["ordering"] != contender or key not in dense:
            continue
        ratio = r["median_s"] / dense[key]["median_s"]
        ceiling = gemm_gflops.get(r["backend"])
        rows.append(
            {
                "backend": key[0], "case": key[1], "batch": key[2], "method": r["method"], "x dense": ratio,
                "flops vs dense": r["flops"] / dense[key]["flops"],
                "efficiency": r["flops"] / dense[key]["flops"] / ratio,
                "% of GEMM": 100 * r["gflops_per_s"] / ceiling if ceiling else math.nan,
            }
        )  # fmt: skip
    return rows


def planner_figures(rows: Sequence[dict[str, Any]], contender: str = "auto") -> tuple[float, float, float]:
    """Median, geometric mean and worst of ``contender``'s time / the fastest ordering's."""
    ratios = [row[contender] for row in rows if contender in row]
    if not ratios:
        return math.nan, math.nan, math.nan
    return statistics.median(ratios), math.exp(statistics.fmean(map(math.log, ratios))), max(ratios)


#: The CostModel weights the fit searches, around what this machine measures: GEMM peaks from 4e10 to
#: 3.2e11 flop/s (the measured torch ceiling is 3.1-3.4e11), bandwidths from 2e8 to 4e9 elements/s
#: (8 GB/s measured is 2e9 float32), and around the ~90 us timed to wake the second BLAS thread.
FIT_GRID: dict[str, list[float]] = {
    "peak_flops": [4e10, 8e10, 1.6e11, 3.2e11],
    "bandwidth": [2e8, 4e8, 1e9, 2e9, 4e9],
    "half_size": [1, 2, 8, 32],
    "step_overhead": [1e-5, 2e-5, 4e-5],
    "tolerance": [0.0, 0.03, 0.1, 0.2],
    "parallel_overhead": [0.0, 5e-5, 9e-5, 1.5e-4],
    "planned_step_overhead": [6e-5, 1.5e-4, 2.5e-4, 4e-4],
}

PARALLEL_THRESHOLD = cost_model_for("torch").parallel_threshold
"""``M*N*K`` from which MKL's sgemm splits a product across the 2 threads of this machine (found by
timing random shapes on 1 and 2 threads); ``--fit`` fits the cost of waking the threads."""


def _as_planned(r: dict[str, Any], gradients: str) -> tuple[tnlayers.ContractionPlan, Any]:
    """The plan a record ran, rebuilt from its path, and what the bound on training memory makes its
    backward recompute (:func:`tnlayers.layer.recomputed_steps`; ``None``: nothing, or no bound applies).
    Only torch's layer plans within the bound; a record without ``saved_budget`` ran under the default."""
    spec = tnlayers.MPOSpec(tuple(r["in_modes"]), tuple(r["out_modes"]), tuple(r["ranks"][1:-1]))
    planned = tnlayers.plan(spec, r["batch"], [tuple(pair) for pair in r["path"]], gradients=gradients)
    budget = r.get("saved_budget", kit.DEFAULT_SAVED_BUDGET) if r["backend"] == "torch" else None
    if gradients == "none":
        return planned, None
    return planned, kit.recomputed_steps(
        planned, planned.batch_size, operand_needs(gradients, spec.n_cores + 1), budget
    )


def _picked_ratios(records: Sequence[dict[str, Any]], mode: str) -> Callable[[tnlayers.CostModel], list[float]]:
    """``model -> [time of the path it picks / the fastest path's]`` per (backend, case, batch) of ``records``
    (any ordering, opt_einsum's and cotengra's included; a path's time is the median over the contenders
    that ran it, as in :func:`ratio_table`). Each candidate is costed as a layer plans it: for what it
    runs for, and, in training under torch's bound on what it keeps, with what recomputing costs."""
    gradients = "none" if mode == "forward" else "cores"
    groups: dict[tuple[Any, ...], list[tuple[dict[str, Any], tnlayers.ContractionPlan, Any]]] = {}
    for r in records:
        if r["mode"] == mode and r["ordering"] in AUTO_CHOICES:
            key = (r["backend"], r["case"], r["batch"])
            groups.setdefault(key, []).append((r, *_as_planned(r, gradients)))
    path_time, ran = path_times(records, mode)
    fastest = {key: min(times.values()) for key, times in path_time.items()}

    def pick(model: tnlayers.CostModel, group: list[tuple[dict[str, Any], tnlayers.ContractionPlan, Any]]) -> str:
        costs = [plan_cost(p, model) + model.bound_cost(len(p.steps), recomputed) for _, p, recomputed in group]
        return str(group[model.choose_index(costs, [r["flops"] for r, _, _ in group])][0]["ordering"])

    def ratios(model: tnlayers.CostModel) -> list[float]:
        return [path_time[key][ran[(*key, pick(model, group))]] / fastest[key] for key, group in groups.items()]

    return ratios


def _figures(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), math.exp(statistics.fmean(map(math.log, values))), max(values)


def score_cost_model(
    model: tnlayers.CostModel, records: Sequence[dict[str, Any]], mode: str = "forward+backward"
) -> tuple[float, float, float]:
    """(median, geometric mean, worst) of the time of the path ``model`` picks over the fastest path's, on
    ``records``: how a fit holds on a run it was not fitted to."""
    return _figures(_picked_ratios(records, mode)(model))


def fit_cost_model(
    records: Sequence[dict[str, Any]], mode: str = "forward+backward"
) -> tuple[tnlayers.CostModel, tuple[float, float, float]]:
    """Grid search of CostModel weights for ``auto``'s choice among its candidates.

    Scored by the worst, then the geometric mean, of the picked path's time / the fastest path's
    (see :func:`score_cost_model`), a worst within 1.5x counting as met; returns the model and its
    (median, geometric mean, worst) on these records.
    """
    ratios = _picked_ratios(records, mode)

    def score(model: tnlayers.CostModel) -> tuple[float, float]:
        values = ratios(model)  # the bound first (worst within 1.5x), then the geometric mean
        return max(max(values), 1.5), round(math.exp(statistics.fmean(map(math.log, values))), 4)

    grid = itertools.product(*FIT_GRID.values())
    models = (
        tnlayers.CostModel(p, b, h, o, t, PARALLEL_THRESHOLD if w else math.inf, w, planned_step_overhead=q)
        for p, b, h, o, t, w, q in grid
    )
    best = min(models, key=score)
    return best, _figures(ratios(best))
