"""Measuring one case: every contender checked against the dense product, then timed round-robin;
the per-call overhead of the torch layer; the environment of the run."""

from __future__ import annotations

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
from tnlayers.allocator import allocator_setting
from tnlayers.autotune import Autotuner
from tnlayers.cost import cost_model_for
from tnlayers.plan import auto_candidates
from tnlayers.timing import calls_per_sample, round_robin

from .cases import Case
from .runners import Runner, TorchRunner

SLOW_CALL_S = 0.3
"""A contender whose one call takes longer is timed alone with SLOW_REPEATS calls (zipper at large batch)."""
SLOW_REPEATS = 3


def _seconds_once(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _cotengra() -> Any:
    """cotengra's hyper-optimiser, or ``None`` where cotengra is not installed."""
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
            budget = runner.saved_budget if runner.backend == "torch" else None  # torch's layer plans within it
            plans[name] = kit.LayerPlanner.make(spec, "auto", runner.backend).plan(
                batch, gradients, saved_budget=budget
            )
        elif name == "autotune":
            run = runner.forward if gradients == "none" else runner.train_step
            key = kit.tune_key(runner.backend, runner.device, str(runner.x_np.dtype), gradients)
            plans[name] = tuner.tune(spec, batch, run, key, cost_model=model, gradients=gradients)
        elif name in candidates:
            plans[name] = candidates[name]
        elif name == "cotengra" and (optimizer := _cotengra()) is not None:
            plans[name] = tnlayers.plan(spec, batch, optimizer, cost_model=model)
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
                record["saved_budget"] = runner.saved_budget
                plan = train_plans.get(record["ordering"])
                if plan is not None and isinstance(runner, TorchRunner):  # the same plan, nothing recomputed
                    record["memory_bytes_unbounded"] = runner.memory(runner.train_step(plan, saved_budget=None))
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
        "weight_route": bool(plan and plan.builds_weight and (mode == "forward" or runner.trains_weight_route)),
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
        "allocator": allocator_setting(),
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
