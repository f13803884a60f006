"""Measuring one case: every contender checked against the dense product, then timed round-robin;
the per-call overhead of the torch layer; the environment of the run."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import opt_einsum

import tnlayers
from tnlayers import layer as kit
from tnlayers.autotune import Autotuner
from tnlayers.contract import execute, get_ops
from tnlayers.cost import cost_model_for
from tnlayers.plan import auto_candidates
from tnlayers.timing import calls_per_sample, round_robin

from .cases import CASES, Case
from .runners import Runner

SLOW_CALL_S = 0.3
"""A contender whose one call takes longer is timed alone with SLOW_REPEATS calls (zipper at large batch)."""
SLOW_REPEATS = 3


def _seconds_once(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _cotengra(n_cores: int) -> Any:
    try:
        import cotengra
    except ImportError:
        return None
    return cotengra.HyperOptimizer(max_repeats=16, minimize="flops", progbar=False, parallel=False)


def _plans(
    runner: Runner, orderings: Sequence[str], gradients: str, tuner: Autotuner
) -> dict[str, tnlayers.ContractionPlan]:
    """The plan of each ordering: ``auto``'s candidates by name, cotengra, and the planners themselves."""
    spec, batch = runner.spec, runner.batch
    model = cost_model_for(runner.backend)
    candidates = {p.method: p for p in auto_candidates(spec, batch, model)}
    plans = {}
    for name in orderings:
        if name == "auto":  # what a layer plans: for a forward, or for training with the input as data
            plans[name] = tnlayers.plan(spec, batch, "auto", cost_model=model, gradients=gradients)
        elif name == "autotune":
            run = runner.forward if gradients == "none" else runner.train_step
            key = kit.tune_key(runner.backend, runner.device, str(runner.x_np.dtype), gradients)
            plans[name] = tuner.tune(spec, batch, run, key, cost_model=model, gradients=gradients)
        elif name in candidates:
            plans[name] = candidates[name]
        elif name == "cotengra" and _cotengra(spec.n_cores) is not None:
            plans[name] = tnlayers.plan(spec, batch, _cotengra(spec.n_cores), cost_model=model)
    return plans


def measure_case(
    runner: Runner, orderings: Sequence[str], repeats: int, modes: Sequence[str], case: Case, tuner: Autotuner
) -> list[dict[str, Any]]:
    """Check every contender's output against the dense product, then time them round-robin."""
    plans = _plans(runner, orderings, "none", tuner)
    planned_for_training = [name for name in ("auto", "autotune") if name in plans]
    train_plans = {**plans, **_plans(runner, planned_for_training, "cores", tuner)}
    reference = runner.x_np.astype(np.float64) @ runner.weight_np.astype(np.float64)
    scale = float(np.abs(reference).max())
    tolerance = 1e-3 if runner.x_np.dtype == np.float32 else 1e-9
    dense_forward, dense_train = runner.dense()
    contenders: dict[str, dict[str, Callable[[], Any]]] = {
        "forward": {name: runner.forward(p) for name, p in plans.items()},
        "forward+backward": {name: runner.train_step(p) for name, p in train_plans.items()},
    }
    contenders["forward"]["dense"], contenders["forward+backward"]["dense"] = dense_forward, dense_train
    for name, (peer_forward, peer_train) in runner.peers().items():
        contenders["forward"][name], contenders["forward+backward"][name] = peer_forward, peer_train
    checks = {
        **contenders["forward"],
        **{f"{n} (training plan)": runner.forward(train_plans[n]) for n in planned_for_training},
    }
    for name, run in checks.items():
        error = float(np.abs(runner.to_numpy(run()).astype(np.float64) - reference).max()) / scale
        if error > tolerance:
            raise RuntimeError(f"{name} is wrong on {case.name} at batch {runner.batch}: relative error {error:.1e}")
    records = []
    for mode in modes:
        runs = contenders[mode]
        once = {name: _seconds_once(run) for name, run in runs.items()}  # also the warm-up
        quick = {name: run for name, run in runs.items() if once[name] <= SLOW_CALL_S}
        inner = calls_per_sample(runs["auto"] if "auto" in quick else next(iter(quick.values())), 5e-3) if quick else 1
        times = round_robin(quick, repeats, inner, warmup=1) if quick else {}
        for name in runs.keys() - quick.keys():  # far slower than the rest: a few plain calls keep the run short
            times[name] = round_robin({name: runs[name]}, SLOW_REPEATS, 1, warmup=0)[name]
        for name, samples in times.items():
            plan = (plans if mode == "forward" else train_plans).get(name)
            records.append(_record(runner, case, mode, name, plan, samples, inner if name in quick else 1))
        if mode == "forward+backward":
            for record in records[-len(times) :]:
                record["memory_bytes"] = runner.memory(runs[record["ordering"]])
    return records


def _record(
    runner: Runner,
    case: Case,
    mode: str,
    name: str,
    plan: tnlayers.ContractionPlan | None,
    samples: Sequence[float],
    inner: int,
) -> dict[str, Any]:
    """One measurement: what ran (``plan`` is ``None`` for a baseline), its time and its work."""
    median = statistics.median(samples)
    flops = plan.flops if plan else 2 * runner.batch * runner.spec.in_features * runner.spec.out_features
    work = flops if mode == "forward" else 3 * flops  # backward: two products per forward product
    return {
        "backend": runner.backend,
        "device": runner.device,
        "case": case.name,
        "group": case.group,
        "in_modes": list(case.in_modes),
        "out_modes": list(case.out_modes),
        "ranks": list(runner.spec.ranks),
        "batch": runner.batch,
        "dtype": str(runner.x_np.dtype),
        "mode": mode,
        "ordering": name,
        "method": plan.method if plan else name,
        "path": [list(p) for p in plan.path] if plan else None,
        "median_s": median,
        "q25_s": float(np.quantile(samples, 0.25)),
        "q75_s": float(np.quantile(samples, 0.75)),
        "repeats": len(samples),
        "calls_per_sample": inner,
        "flops": flops,
        "gflops_per_s": work / median / 1e9,
        "largest_intermediate": plan.largest_intermediate if plan else runner.batch * runner.spec.out_features,
        "step_sizes": [list(s) for s in plan.step_sizes] if plan else None,
        "model_cost": plan.cost if plan else None,
    }


def overhead(repeats: int = 7) -> list[dict[str, Any]]:
    """Per-call cost of a torch ``MPOLinear`` forward at batch 1 against a bare chain of ``torch.einsum`` calls.

    Three contenders on the same input and cores, under ``no_grad``: the layer (input checks, bucket,
    plan lookup, execute), ``execute`` of the cached plan alone, and the plan's pairwise equations
    typed out as ``torch.einsum`` calls (no tnlayers code at all). The layer's Python overhead is
    layer minus bare chain.
    """
    import torch
    from tnlayers.backends.torch import MPOLinear

    TORCH_OPS = get_ops("torch")
    records = []
    for case in (CASES[1], Case("1024 4x4x4x4x4 D8", "square", (4,) * 5, (4,) * 5, 8)):
        layer = MPOLinear(case.in_modes, case.out_modes, case.rank, bias=False, seed=0)
        x = torch.randn(1, layer.in_features)
        plan = tnlayers.plan(layer.spec, 1, cost_model=cost_model_for("torch"))
        cores = [c.detach() for c in layer.cores]
        shapes = plan.operand_shapes
        equations = [(step.positions, step.forward.equation) for step in plan.steps]

        def bare(x: Any = x, cores: Any = cores, shapes: Any = shapes, equations: Any = equations) -> Any:
            arrays = [x.reshape(shapes[0]), *(c.reshape(s) for c, s in zip(cores, shapes[1:]))]
            for (i, j), equation in equations:
                a, b = arrays.pop(i), arrays.pop(j)
                arrays.append(torch.einsum(equation, a, b))
            return arrays[0].reshape(1, -1)

        runs: dict[str, Callable[[], object]] = {
            "layer forward": functools.partial(layer, x),
            "execute (cached plan)": functools.partial(execute, plan, x, cores, None, TORCH_OPS),
            "bare torch.einsum chain": bare,
        }
        with torch.no_grad():
            torch.testing.assert_close(runs["layer forward"](), bare(), rtol=1e-4, atol=1e-5)
            times = round_robin(runs, repeats, calls_per_sample(bare, 5e-3), warmup=2)
        medians = {name: statistics.median(t) for name, t in times.items()}
        base = medians["bare torch.einsum chain"]
        layer_s = medians["layer forward"]
        records.append(
            {
                "case": case.name,
                "method": plan.method,
                **{k: 1e6 * v for k, v in medians.items()},
                "overhead_us": 1e6 * (layer_s - base),
                "overhead_vs_contraction": (layer_s - base) / base,
                "dispatch_us": 1e6 * (layer_s - medians["execute (cached plan)"]),
            }
        )
    return records


def environment(backends: Sequence[str], threads: int | None, device: str, gemm: dict[str, float]) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "opt_einsum": opt_einsum.__version__,
        "tnlayers": tnlayers.__version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "device": device,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gemm_gflops": gemm,
    }
    if "torch" in backends:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if "tensorflow" in backends:
        import tensorflow as tf

        env["tensorflow"] = tf.__version__
    if "jax" in backends:
        import jax

        env["jax"] = jax.__version__
    env["threads"] = threads
    return env


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def profile(case: Case, batch: int, dtype: str = "float32", device: str = "cpu", repeats: int = 5) -> str:
    """Where ``auto``'s forward+backward of ``case`` spends its time in torch: products, copies, the rest.

    A table of torch's profiler (self CPU time per op over ``repeats`` calls), after the plan's steps
    and a line per group: GEMM (``mm``/``bmm``/``addmm``), copies (``copy_``, ``clone``), everything else.
    """
    import torch

    from .runners import TorchRunner

    runner = TorchRunner(case.spec, batch, dtype, device)
    chosen = tnlayers.plan(case.spec, batch, cost_model=cost_model_for("torch"), gradients="cores")
    run = runner.train_step(chosen)
    dense = runner.dense()[1]
    for _ in range(2):
        run(), dense()
    with torch.profiler.profile() as profiler:
        for _ in range(repeats):
            run()
    events = profiler.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"GEMM": ("aten::mm", "aten::bmm", "aten::addmm"), "copies": ("aten::copy_", "aten::clone")}
    shares = {name: sum(e.self_cpu_time_total for e in events if e.key in keys) for name, keys in groups.items()}
    dense_s = statistics.median(round_robin({"dense": dense}, repeats)["dense"])
    lines = [chosen.describe(), f"dense layer, forward+backward: {1e3 * dense_s:.3f} ms", "per call:"]
    for name, share in shares.items():
        lines.append(f"  {name:<7} {share / repeats / 1e3:8.3f} ms ({100 * share / total:.0f}%)")
    rest = total - sum(shares.values())
    lines.append(f"  {'other':<7} {rest / repeats / 1e3:8.3f} ms ({100 * rest / total:.0f}%)")
    lines.append(str(events.table(sort_by="self_cpu_time_total", row_limit=8)))
    return "\n".join(lines)
