"""Where a training call's time goes with glibc's allocator as it comes, and after ``tnlayers.reuse_freed_memory()``.

    python -m benchmarks.allocator                 # FC2 at D=16, batch 256: the W route, step by step
    python -m benchmarks.allocator --quick         # a smoke run of a few seconds

The ``W`` route of a torch MPO layer (build ``W`` from two halves, one product; backward: ``x``'s
gradient, ``dW = xᵀ g``, its transposing copy, the halves' gradients) is timed step by step inside a
training loop, as the layer runs it, beside the whole forward+backward of ``MPOLinear`` and of
``nn.Linear`` holding the same ``W``. An allocator setting cannot be undone in a process, so each
configuration runs in a child process of its own, alternated ``--rounds`` times; the table gives the
median over rounds of each child's median. Each step writes a fresh array, so it shows what first
writes to fresh pages cost (faulted in and zeroed by the kernel).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

STEPS = (
    "W's halves",
    "L @ R",
    "transposing copy into W",
    "x @ W + bias",
    "x's gradient, g Wᵀ",
    "dW = xᵀ g",
    "dW's transposing copy",
    "the halves' gradients",
)
CONFIGURATIONS = ("default", "reuse_freed_memory")


def _child(configuration: str, batch: int, rank: int, calls: int) -> dict[str, float]:
    """Median seconds of each step and of the two layers' forward+backward, in this process."""
    import tnlayers

    if configuration == "reuse_freed_memory" and not tnlayers.reuse_freed_memory():
        raise SystemExit("reuse_freed_memory needs glibc's allocator")
    import torch
    from tnlayers.backends.torch import MPOLinear

    from tnlayers.contract import get_ops, weight_halves
    from tnlayers.plan import weight_split

    ops = get_ops("torch")
    torch.manual_seed(0)
    layer = MPOLinear((4, 7, 7, 4), (4, 4, 4, 4), rank=rank)
    dense = layer.to_linear()
    cores = [core.detach() for core in layer.cores]
    x = torch.randn(batch, layer.in_features)
    bias = layer.bias.detach()
    spec, split = layer.spec, weight_split(layer.spec.core_shapes)  # where dense_weight cuts W into halves
    in_left, out_left = math.prod(spec.in_modes[:split]), math.prod(spec.out_modes[:split])
    in_right, out_right = spec.in_features // in_left, spec.out_features // out_left

    def route() -> list[float]:
        clock = [time.perf_counter()]
        left, right = weight_halves(cores, ops)
        clock.append(time.perf_counter())
        product = left @ right
        clock.append(time.perf_counter())
        weight = product.reshape(in_left, out_left, in_right, out_right).permute(0, 2, 1, 3)
        weight = weight.reshape(spec.in_features, spec.out_features)
        clock.append(time.perf_counter())
        y = torch.addmm(bias, x, weight)
        clock.append(time.perf_counter())
        grad = torch.ones_like(y)
        grad_x = grad @ weight.T
        clock.append(time.perf_counter())
        grad_weight = x.T @ grad
        clock.append(time.perf_counter())
        grad_product = grad_weight.reshape(in_left, in_right, out_left, out_right).permute(0, 2, 1, 3)
        grad_product = grad_product.reshape(in_left * out_left, in_right * out_right)
        clock.append(time.perf_counter())
        grads = (grad_product @ right.T, left.T @ grad_product)
        clock.append(time.perf_counter())
        del grad_x, grads
        return [b - a for a, b in itertools.pairwise(clock)]

    def train(module: torch.nn.Module) -> float:
        start = time.perf_counter()
        for p in module.parameters():
            p.grad = None  # a fresh gradient buffer, as zero_grad() leaves it
        module(x).sum().backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in (*STEPS, "MPOLinear", "nn.Linear")}
    for call in range(calls + 5):
        steps, mpo, linear = route(), train(layer), train(dense)
        if call >= 5:  # warm-up
            for name, seconds in zip(STEPS, steps):
                times[name].append(seconds)
            times["MPOLinear"].append(mpo)
            times["nn.Linear"].append(linear)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(batch: int, rank: int, calls: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per configuration and step, one median per child process, the configurations alternated."""
    found: dict[str, dict[str, list[float]]] = {c: {} for c in CONFIGURATIONS}
    for _ in range(rounds):
        for configuration in CONFIGURATIONS:
            command = [sys.executable, "-m", "benchmarks.allocator", "--child", configuration]
            command += ["--batch", str(batch), "--rank", str(rank), "--calls", str(calls)]
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            for name, seconds in json.loads(done.stdout.splitlines()[-1]).items():
                found[configuration].setdefault(name, []).append(seconds)
    return found


def table(found: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = [f"| step | {' us | '.join(CONFIGURATIONS)} us | ratio |", "|---|---|---|---|"]
    for name in found[CONFIGURATIONS[0]]:
        default, reused = (1e6 * statistics.median(found[c][name]) for c in CONFIGURATIONS)
        lines.append(f"| {name} | {default:.0f} | {reused:.0f} | {reused / default:.2f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.allocator", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=300, help="timed calls per child process")
    parser.add_argument("--rounds", type=int, default=2, help="child processes per configuration, alternated")
    parser.add_argument("--quick", action="store_true", help="20 calls, one round")
    parser.add_argument("--child", choices=CONFIGURATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.batch, args.rank, args.calls)))
        return {}
    calls, rounds = (20, 1) if args.quick else (args.calls, args.rounds)
    import torch

    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"FC2 784 -> 256 at D={args.rank}, batch {args.batch}; torch {torch.__version__}, ", end="")
    print(f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={policy}; {calls} calls x {rounds} rounds")
    found = measure(args.batch, args.rank, calls, rounds)
    print("\n".join(table(found)))
    totals = {c: math.fsum(statistics.median(found[c][s]) for s in STEPS) for c in CONFIGURATIONS}
    print("the route's steps together: " + ", ".join(f"{c} {1e6 * t:.0f} us" for c, t in totals.items()))
    return found


if __name__ == "__main__":
    main()
