"""How much of the MPO layer's gap to ``nn.Linear`` is Python and autograd, and how much is torch's kernels.

    python -m benchmarks.kernel_bound              # FC2 at D=8 and 16, LeNet's 120 -> 84 and 400 -> 120, 1000 -> 300
    python -m benchmarks.kernel_bound --quick      # a smoke run (one layer, batch 1 and 64)
    python -m benchmarks.kernel_bound --reuse-freed-memory   # after tnlayers.reuse_freed_memory()

The ``W`` route (build ``W`` from two halves of the chain of cores, one product; backward: ``x``'s
gradient, ``dW = xᵀ g``, the halves' and the cores' gradients from ``dW``) is written twice as one
``torch.autograd.Function`` that keeps ``W`` and its halves and runs the fewest kernels this route
needs: once in Python, once in C++ over the same ATen kernels (``benchmarks/kernel_bound.cpp``,
compiled here on the first run with ``torch.utils.cpp_extension``: about 40 s, needs a C++ compiler).
Both are timed forward+backward beside ``nn.Linear`` holding the same ``W`` and beside ``MPOLinear``
(its ``auto`` plan, and ``strategy="materialize"``, which runs the same route on autograd's tape),
shuffled round-robin in one process. What the C++ twin still takes over ``nn.Linear`` is the cost of
the kernels themselves (the ``W``-sized passes and the small products), which no Python-side change can
remove. The twins are measuring instruments, not library code: they have no double backward, no
``torch.compile`` or ``torch.func`` support and no input checks.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

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
from tnlayers.plan import weight_split
from tnlayers.timing import calls_per_sample, round_robin

CASES = [  # (label, in_modes, out_modes, rank)
    ("FC2 784->256", (4, 7, 7, 4), (4, 4, 4, 4), 8),
    ("FC2 784->256", (4, 7, 7, 4), (4, 4, 4, 4), 16),
    ("LeNet fc 120->84", (2, 5, 3, 2, 2), (2, 3, 2, 7, 1), 4),
    ("LeNet conv3 400->120", (4, 5, 5, 4), (2, 3, 5, 4), 4),
    ("uneven 1000->300", (10, 10, 10), (5, 6, 10), 16),
]
BATCHES = (1, 32, 256, 1024)
QUICK_CASES, QUICK_BATCHES = [CASES[0]], (1, 64)
CONTENDERS = ("dense", "auto", "materialize", "python twin", "c++ twin")
SOURCE = Path(__file__).with_suffix(".cpp")


def _chain(cores: Sequence[torch.Tensor], a: int, b: int) -> list[torch.Tensor]:
    """The products of the cores ``[a, b)``, each ``(r_a * I * J, r)`` with rows ``(r_a, I, J)``."""
    first = cores[a]
    rows, cols = first.shape[0] * first.shape[1], first.shape[2]
    products = [first.reshape(rows * cols, first.shape[3])]
    for core in cores[a + 1 : b]:
        r, i, j, r2 = core.shape
        step = products[-1] @ core.reshape(r, i * j * r2)
        products.append(step.view(rows, cols, i, j, r2).transpose(1, 2).reshape(rows * i * cols * j, r2))
        rows, cols = rows * i, cols * j
    return products


def _chain_backward(
    cores: Sequence[torch.Tensor], a: int, b: int, grad: torch.Tensor, products: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The gradients of the cores ``[a, b)`` from that of their last product."""
    rows, cols = [cores[a].shape[0] * cores[a].shape[1]], [cores[a].shape[2]]
    for core in cores[a + 1 : b]:
        rows.append(rows[-1] * core.shape[1])
        cols.append(cols[-1] * core.shape[2])
    grads: list[torch.Tensor] = []
    for k in range(b - 1, a, -1):
        r, i, j, r2 = cores[k].shape
        m, n = rows[k - 1 - a], cols[k - 1 - a]
        g = grad.reshape(m, i, n, j, r2).transpose(1, 2).reshape(m * n, i * j * r2)
        grads.append((products[k - 1 - a].T @ g).view(r, i, j, r2))
        grad = g @ cores[k].reshape(r, i * j * r2).T
    grads.append(grad.reshape(cores[a].shape))
    return grads[::-1]


def _sizes(cores: Sequence[torch.Tensor], split: int) -> tuple[int, int, int, int]:
    """``(IL, JL, IR, JR)``: the input and output sizes of the two halves."""
    return (
        math.prod(c.shape[1] for c in cores[:split]),
        math.prod(c.shape[2] for c in cores[:split]),
        math.prod(c.shape[1] for c in cores[split:]),
        math.prod(c.shape[2] for c in cores[split:]),
    )


def python_forward(
    x: torch.Tensor, bias: torch.Tensor, cores: Sequence[torch.Tensor], split: int
) -> tuple[torch.Tensor, ...]:
    """``(y, W, left, right)``: ``y = x @ W + bias`` with ``W`` from its halves (as the C++ ``forward``)."""
    in_left, out_left, in_right, out_right = _sizes(cores, split)
    left = _chain(cores, 0, split)[-1]
    right = _chain(cores, split, len(cores))[-1].view(cores[split].shape[0], -1)
    weight = (left @ right).view(in_left, out_left, in_right, out_right).transpose(1, 2)
    weight = weight.reshape(in_left * in_right, out_left * out_right)
    return torch.addmm(bias, x, weight), weight, left, right


def python_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    cores: Sequence[torch.Tensor],
    split: int,
    need_x: bool,
    need_bias: bool,
) -> list[torch.Tensor | None]:
    """``[x's gradient, the bias's, the cores'...]`` (as the C++ ``backward``; ``None`` where not asked for)."""
    in_left, out_left, in_right, out_right = _sizes(cores, split)
    grad_weight = (x.T @ grad).view(in_left, in_right, out_left, out_right).transpose(1, 2)
    grad_weight = grad_weight.reshape(in_left * out_left, in_right * out_right)
    n = len(cores)
    left_grads = _chain_backward(cores, 0, split, grad_weight @ right.T, _chain(cores, 0, split))
    right_grad = (left.T @ grad_weight).reshape(-1, cores[-1].shape[3])
    right_grads = _chain_backward(cores, split, n, right_grad, _chain(cores, split, n))
    return [grad @ weight.T if need_x else None, grad.sum(0) if need_bias else None, *left_grads, *right_grads]


def weight_route(forward: Callable[..., Any], backward: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    """``f(x, bias, split, *cores) -> x @ W + bias``, one autograd node running ``forward`` and ``backward``."""

    class WeightRoute(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor, split: int, *cores: torch.Tensor) -> torch.Tensor:
            y, weight, left, right = forward(x, bias, list(cores), split)
            ctx.split = split
            ctx.save_for_backward(x, weight, left, right, *cores)
            return y  # type: ignore[no-any-return]

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            x, weight, left, right, *cores = ctx.saved_tensors
            need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grads = backward(grad.contiguous(), x, weight, left, right, cores, ctx.split, need_x, need_bias)
            return (grads[0] if need_x else None, grads[1] if need_bias else None, None, *grads[2:])

    return WeightRoute.apply


def compile_native(build_dir: Path | None = None, verbose: bool = False) -> Any:
    """The C++ twin (``benchmarks/kernel_bound.cpp``) as a module with ``forward`` and ``backward``."""
    from torch.utils import cpp_extension

    # a ninja installed into this environment (requirements-dev.txt) is found with the interpreter
    scripts, path = os.path.dirname(sys.executable), os.environ.get("PATH", "")
    if scripts not in path.split(os.pathsep):  # once: a second build in the process does not grow PATH
        os.environ["PATH"] = scripts + os.pathsep + path
    if build_dir is not None:
        build_dir.mkdir(parents=True, exist_ok=True)
    directory = None if build_dir is None else str(build_dir)
    return cpp_extension.load(
        "tnlayers_kernel_bound", [str(SOURCE)], extra_cflags=["-O2"], build_directory=directory, verbose=verbose
    )


def contenders(
    layer: MPOLinear, x: torch.Tensor, native: Any
) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Sequence[torch.Tensor]]]:
    """The forward+backward call of each contender (``loss = y.sum()``), and the cores each one trains."""
    dense = layer.to_linear()
    materialize = MPOLinear.from_cores(
        [c.detach().numpy() for c in layer.cores], layer.bias.detach().numpy(), strategy="materialize"
    )
    split = weight_split(layer.spec.core_shapes)
    cores, bias = list(layer.cores), layer.bias
    python_twin = weight_route(python_forward, python_backward)
    modules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "dense": dense,
        "auto": layer,
        "materialize": materialize,
        "python twin": lambda v: python_twin(v, bias, split, *cores),
    }
    if native is not None:
        native_twin = weight_route(native.forward, native.backward)
        modules["c++ twin"] = lambda v: native_twin(v, bias, split, *cores)
    parameters = [*layer.parameters(), *dense.parameters(), *materialize.parameters()]
    holders: dict[str, Sequence[torch.Tensor]] = {name: cores for name in modules if name != "dense"}
    holders["materialize"] = list(materialize.cores)

    def call(module: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            for p in parameters:
                p.grad = None  # a fresh gradient buffer for every contender alike
            y = module(x)
            y.sum().backward()  # type: ignore[no-untyped-call]
            return y

        return run

    return {name: call(module) for name, module in modules.items()}, holders


def check(runs: dict[str, Callable[[], torch.Tensor]], holders: dict[str, Sequence[torch.Tensor]]) -> None:
    """Every contender's output against the dense layer's, and its cores' gradients (``holders``: the cores
    each contender trains) against those of ``MPOLinear``'s ``auto`` plan on autograd's tape."""
    reference = runs["dense"]()
    scale = float(reference.detach().abs().max())
    runs["auto"]()
    expected = [cast(torch.Tensor, core.grad).clone() for core in holders["auto"]]
    for name, run in runs.items():
        error = float((run() - reference).detach().abs().max()) / scale
        got = [cast(torch.Tensor, core.grad) for core in holders.get(name, ())]
        grads = [float((g - e).abs().max() / e.abs().max()) for g, e in zip(got, expected)]
        if error > 1e-4 or any(g > 1e-3 for g in grads):
            raise RuntimeError(f"{name} differs from the dense layer: output {error:.1e}, core gradients {grads}")


def measure(cases: Sequence[Any], batches: Sequence[int], repeats: int, native: Any) -> list[dict[str, Any]]:
    records = []
    for label, in_modes, out_modes, rank in cases:
        torch.manual_seed(0)
        layer = MPOLinear(in_modes, out_modes, rank)
        for batch in batches:
            x = torch.randn(batch, layer.in_features)
            runs, holders = contenders(layer, x, native)
            check(runs, holders)
            inner = calls_per_sample(runs["auto"])
            times = round_robin(runs, repeats, inner)
            medians = {name: statistics.median(samples) for name, samples in times.items()}
            row = {"case": label, "rank": rank, "batch": batch, "seconds": medians}
            records.append(row)
            print(_line(row), flush=True)
    return records


def _line(row: dict[str, Any]) -> str:
    seconds = row["seconds"]
    ratios = " ".join(f"{seconds.get(name, math.nan) / seconds['dense']:>11.2f}" for name in CONTENDERS[1:])
    twins = seconds.get("c++ twin", math.nan) / seconds["python twin"]  # nan under --no-native
    head = f"{row['case']:<21} {row['rank']:>3} {row['batch']:>5} {1e3 * seconds['dense']:9.3f} "
    return head + ratios + f" {twins:>9.2f}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bound", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="one layer at batch 1 and 64, 2 repeats")
    parser.add_argument("--no-native", action="store_true", help="leave out the C++ twin (no compiler needed)")
    parser.add_argument("--build-dir", type=Path, default=None, help="where to compile the C++ twin")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON line per case and batch here")
    add_allocator_option(parser)
    args = parser.parse_args(argv)
    apply_allocator_option(parser, args)
    warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
    native = None if args.no_native else compile_native(args.build_dir)
    environment = torch_environment()
    print(torch_environment_line(environment) + "; forward+backward, time / nn.Linear's")
    names = " ".join(f"{name:>11}" for name in CONTENDERS[1:])
    print(f"{'case':<21} {'D':>3} {'batch':>5} {'dense ms':>9} {names} {'c++/python':>9}")
    cases, batches = (QUICK_CASES, QUICK_BATCHES) if args.quick else (CASES, BATCHES)
    records = measure(cases, batches, 2 if args.quick else args.repeats, native)
    write_records(args.out, records, environment)


if __name__ == "__main__":
    main()
