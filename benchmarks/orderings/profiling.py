"""Where time goes: the torch layer's per-call overhead against a bare chain of einsum calls, and a profile
of ``auto``'s forward+backward split into products, copies and the rest."""

from __future__ import annotations

import functools
import statistics
from collections.abc import Callable
from typing import Any

import tnlayers
from tnlayers.contract import execute, get_ops
from tnlayers.cost import cost_model_for
from tnlayers.timing import calls_per_sample, round_robin

from .cases import CASES, Case


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
