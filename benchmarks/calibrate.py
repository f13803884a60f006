"""Time the named contraction orderings side by side and check (or fit) the planner's cost model.

    python -m benchmarks.calibrate --backend torch            # forward+backward, the 32-case grid
    python -m benchmarks.calibrate --backend numpy --fit      # forward only, then fit CostModel weights
    python -m benchmarks.calibrate --quick                    # a few seconds: 2 shapes, batch 1 and 64

For each case every ordering runs on the same inputs, round-robin, and its output is first checked
against the dense product. It prints, per case, the fastest ordering, what ``auto`` chose and the
ratio of their median times, then the median, geometric mean and worst ratio over the grid. With
``--out`` it writes one JSON line per measurement. Times are wall-clock medians of this machine;
quote the ratios, which move far less between runs than absolute times.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import platform
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts: see ../shared/BENCHMARKING.md

import numpy as np

import tnlayers
from benchmarks.timing import round_robin, write_records
from tnlayers.contract import execute, get_ops

ORDERINGS = ("zipper", "reverse-zipper", "materialize", "greedy", "dp", "optimal")
CASES = [  # (in_modes, out_modes, rank)
    ((4, 7, 7, 4), (4, 4, 4, 4), 8),
    ((4, 7, 7, 4), (4, 4, 4, 4), 16),
    ((4,) * 5, (4,) * 5, 8),
    ((4,) * 5, (4,) * 5, 16),
    ((16, 16, 16), (16, 16, 16), 8),
    ((8, 8, 8, 8), (8, 8, 8, 8), 16),
    ((8, 8, 8, 8), (8, 8, 8, 8), 32),
    ((2, 10, 10, 2), (2, 5, 6, 2), 4),
]
BATCHES = (1, 32, 256, 1024)
QUICK_CASES, QUICK_BATCHES = [CASES[0], CASES[7]], (1, 64)


def _runner(backend: str, spec: tnlayers.MPOSpec, batch: int, seed: int) -> tuple[Callable[[Any], Any], Any]:
    """A function running one plan (forward, or forward+backward for torch) and the dense reference."""
    rng = np.random.default_rng(seed)
    cores = tnlayers.init_cores(spec, seed=seed)
    x = rng.normal(size=(batch, spec.in_features)).astype(np.float32)
    reference = x.astype(np.float64) @ tnlayers.to_dense(cores).astype(np.float64)
    ops = get_ops(backend)
    if backend == "numpy":
        return (lambda plan: execute(plan, x, cores, None, ops)), reference
    import torch

    x_t = torch.from_numpy(x)
    cores_t = [torch.from_numpy(c).requires_grad_(True) for c in cores]

    def forward_backward(plan: Any) -> Any:
        for core in cores_t:
            core.grad = None
        y = execute(plan, x_t, cores_t, None, ops)
        y.sum().backward()
        return y.detach().numpy()

    return forward_backward, reference


def measure(backend: str, cases: Sequence[Any], batches: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    records = []
    for (in_modes, out_modes, rank), batch in itertools.product(cases, batches):
        spec = tnlayers.MPOSpec(in_modes, out_modes, rank)
        run, reference = _runner(backend, spec, batch, seed=0)
        plans = {name: tnlayers.plan(spec, batch, name) for name in ORDERINGS}
        scale = np.abs(reference).max()
        for name, plan in plans.items():
            error = np.abs(np.asarray(run(plan), dtype=np.float64) - reference).max() / scale
            if error > 1e-4:
                raise RuntimeError(f"{name} on {spec} at batch {batch} is wrong: relative error {error:.2e}")
        inner = max(1, int(2e6 // max(min(p.flops for p in plans.values()), 1)))  # ~ms per sample
        contenders = {name: functools.partial(run, plan) for name, plan in plans.items()}
        times = round_robin(contenders, repeats, inner, warmup=0)  # the check above warmed them up
        for name, plan in plans.items():
            records.append(
                {
                    "backend": backend,
                    "in_modes": list(in_modes),
                    "out_modes": list(out_modes),
                    "ranks": list(spec.ranks),
                    "batch": batch,
                    "strategy": name,
                    "path": [list(p) for p in plan.path],
                    "flops": plan.flops,
                    "largest_intermediate": plan.largest_intermediate,
                    "step_sizes": [list(s) for s in plan.step_sizes],
                    "median_s": statistics.median(times[name]),
                    "min_s": min(times[name]),
                    "max_s": max(times[name]),
                }
            )
        print(_case_line(records[-len(ORDERINGS) :], tnlayers.DEFAULT_COST_MODEL), flush=True)
    return records


def _groups(records: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["backend"], str(r["in_modes"]), str(r["ranks"]), r["batch"]), []).append(r)
    return list(groups.values())


def _chosen(group: Sequence[dict[str, Any]], model: tnlayers.CostModel) -> dict[str, Any]:
    """The ordering this model would pick among the measured ones (what ``auto`` does among its candidates)."""
    return min(group, key=lambda r: (model.estimate([tuple(s) for s in r["step_sizes"]]), r["flops"]))


def _ratio(group: Sequence[dict[str, Any]], model: tnlayers.CostModel) -> float:
    return float(_chosen(group, model)["median_s"] / min(r["median_s"] for r in group))


def _case_line(group: Sequence[dict[str, Any]], model: tnlayers.CostModel) -> str:
    first = group[0]
    fastest = min(group, key=lambda r: r["median_s"])
    times = " ".join(f"{r['strategy']}={1e3 * r['median_s']:.3f}" for r in group)
    return (
        f"{'x'.join(map(str, first['in_modes'])):>10} r{max(first['ranks']):<3} B{first['batch']:<5} "
        f"fastest={fastest['strategy']:<14} model picks={_chosen(group, model)['strategy']:<14} "
        f"ratio={_ratio(group, model):.2f}  ms: {times}"
    )


def summary(records: Sequence[dict[str, Any]], model: tnlayers.CostModel) -> tuple[float, float, float]:
    """Median, geometric mean and worst ratio of the picked ordering's time to the fastest one's."""
    ratios = [_ratio(group, model) for group in _groups(records)]
    return statistics.median(ratios), math.exp(statistics.fmean(map(math.log, ratios))), max(ratios)


def fit(records: Sequence[dict[str, Any]]) -> tnlayers.CostModel:
    """Grid search of the CostModel weights that minimise the geometric-mean ratio (then the worst)."""
    grid = itertools.product([2e10, 4e10, 6e10, 1e11], [2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9, 2e9], [1, 2, 4, 8, 16, 32])
    models = [tnlayers.CostModel(peak, bandwidth, half) for peak, bandwidth, half in grid]
    return min(models, key=lambda m: (round(summary(records, m)[1], 4), summary(records, m)[2]))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["numpy", "torch"], default="numpy")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="2 shapes at batch 1 and 64, 2 repeats")
    parser.add_argument("--fit", action="store_true", help="also fit the CostModel weights to these times")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per measurement here")
    args = parser.parse_args(argv)
    if args.backend == "torch":
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
    cases, batches = (QUICK_CASES, QUICK_BATCHES) if args.quick else (CASES, BATCHES)
    records = measure(args.backend, cases, batches, 2 if args.quick else args.repeats)
    environment: dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "tnlayers": tnlayers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if args.backend == "torch":
        import torch

        environment.update(torch=torch.__version__, threads=torch.get_num_threads())
    current = summary(records, tnlayers.DEFAULT_COST_MODEL)
    print(f"\ndefault cost model: median {current[0]:.3f}x, geomean {current[1]:.3f}x, worst {current[2]:.3f}x")
    if args.fit:
        best = fit(records)
        fitted = summary(records, best)
        print(f"fitted {best}: median {fitted[0]:.3f}x, geomean {fitted[1]:.3f}x, worst {fitted[2]:.3f}x")
    write_records(args.out, records, environment)


if __name__ == "__main__":
    main()
