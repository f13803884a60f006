"""MPOLinear against nn.Linear holding the same W: inference and training, side by side.

    python -m benchmarks.torch_layers              # FC2, 1024 as 4^5, 1296 as 6^4, 4096 as 8^4 and 16^3
    python -m benchmarks.torch_layers --quick      # a smoke run of a few seconds

Every contender is first checked against the dense product, then timed round-robin in one
process (median of ``--repeats`` samples). Two modes: inference (``eval()`` under ``no_grad``) and
forward+backward (``train()``, ``loss = y.sum()``, gradients of the parameters). The ratio column is
MPO time / dense time (below 1 the MPO layer is faster); efficiency is the plan's flops over the
dense product's, divided by that ratio (1.0: the MPO runs its flops at the dense product's rate).
Quote ratios: absolute times move between runs far more than ratios do. The wait policy and glibc's
allocator are the process's own (users run with both as they come); both are printed and recorded.
``--reuse-freed-memory`` measures the second configuration, after :func:`tnlayers.reuse_freed_memory`.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tnlayers.backends.torch import MPOLinear

import tnlayers
from benchmarks.records import (
    add_allocator_option,
    apply_allocator_option,
    torch_environment,
    torch_environment_line,
    write_records,
)
from tnlayers.timing import calls_per_sample, round_robin

CASES = [  # (label, in_modes, out_modes, rank)
    *[("784->256 FC2", (4, 7, 7, 4), (4, 4, 4, 4), r) for r in (4, 16)],
    ("1024 as 4^5", (4,) * 5, (4,) * 5, 16),
    ("1296 as 6^4", (6,) * 4, (6,) * 4, 12),
    *[("4096 as 8^4", (8, 8, 8, 8), (8, 8, 8, 8), r) for r in (8, 32)],
    ("4096 as 16^3", (16, 16, 16), (16, 16, 16), 8),
]
BATCHES = (1, 32, 256, 1024)
MODES = ("inference", "forward+backward")
QUICK_CASES, QUICK_BATCHES = [CASES[1]], (1, 64)


def _contenders(layer: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    def inference() -> object:
        layer.eval()
        with torch.no_grad():
            return layer(x)

    def forward_backward() -> object:
        layer.train()
        for p in layer.parameters():
            p.grad = None  # a fresh gradient buffer for every contender alike
        y = layer(x)
        y.backward(torch.ones_like(y))
        return y

    return {"inference": inference, "forward+backward": forward_backward}


def measure(cases: Sequence[Any], batches: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    records = []
    for label, in_modes, out_modes, rank in cases:
        torch.manual_seed(0)
        mpo = MPOLinear(in_modes, out_modes, rank)
        dense = mpo.to_linear()  # the same W, so the outputs must agree
        for batch in batches:
            x = torch.randn(batch, mpo.in_features)
            with torch.no_grad():
                error = float((mpo(x) - dense(x)).abs().max() / dense(x).abs().max())
            if error > 1e-4:
                raise RuntimeError(
                    f"MPO output differs from the dense layer: {error:.2e} ({label}, r {rank}, B {batch})"
                )
            plan = mpo.planner.plan(batch, "cores")  # what the layer runs in training
            dense_flops = 2 * batch * mpo.in_features * mpo.out_features
            row: dict[str, Any] = {
                "case": label,
                "rank": rank,
                "batch": batch,
                "plan": plan.method,
                "flops_vs_dense": plan.flops / dense_flops,
            }
            for mode in MODES:
                runs = {"mpo": _contenders(mpo, x)[mode], "dense": _contenders(dense, x)[mode]}
                inner = calls_per_sample(runs["mpo"])
                times = round_robin(runs, repeats, inner)
                row[mode] = {name: statistics.median(samples) for name, samples in times.items()}
            records.append(row)
            print(_line(row), flush=True)
    return records


def _line(row: dict[str, Any]) -> str:
    cells = []
    for mode in MODES:
        mpo, dense = row[mode]["mpo"], row[mode]["dense"]
        cells.append(f"{1e3 * mpo:9.3f} {1e3 * dense:9.3f} {mpo / dense:6.2f}")
    efficiency = row["flops_vs_dense"] / (row["forward+backward"]["mpo"] / row["forward+backward"]["dense"])
    head = f"{row['case']:<13} {row['rank']:>3} {row['batch']:>5} {row['plan']:<14} {row['flops_vs_dense']:6.2f} "
    return head + "   ".join(cells) + f" {efficiency:6.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_layers", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="one shape at batch 1 and 64, 2 repeats")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per case and batch here")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    apply_allocator_option(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
    environment = torch_environment()
    print(torch_environment_line(environment))
    print(f"{'':<45}{'inference ms: mpo, dense, ratio':<33}forward+backward ms: mpo, dense, ratio, efficiency")
    print(f"{'case':<13} {'D':>3} {'batch':>5} {'auto plan':<14} {'flops':>6}")
    cases, batches = (QUICK_CASES, QUICK_BATCHES) if args.quick else (CASES, BATCHES)
    records = measure(cases, batches, 2 if args.quick else args.repeats)
    write_records(args.out, records, environment)


if __name__ == "__main__":
    main()
