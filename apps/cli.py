"""The ``tnlayers`` command (also ``python -m tnlayers.apps``): ``demo``, ``basics`` and ``plan``."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tnlayers.contract import contract
from tnlayers.decompose import from_dense
from tnlayers.init import init_cores
from tnlayers.plan import OPT_EINSUM_STRATEGIES, OWN_STRATEGIES, plan
from tnlayers.spec import MPOSpec

from .tables import format_table

__all__ = ["main"]

DEMO_STRATEGIES = ("auto", *OWN_STRATEGIES, "greedy", "dp", "optimal")


def blur_matrix(in_side: int = 28, out_side: int = 16, width: float = 1.5) -> NDArray[np.float64]:
    """A smooth ``(in_side**2, out_side**2)`` operator: Gaussian-weighted downsampling of an image.

    It is what a trained convolution-like layer looks like: local and smooth, so it compresses well.
    """
    pixels = np.arange(in_side, dtype=np.float64)
    centres = (np.arange(out_side) + 0.5) * in_side / out_side - 0.5
    one_d = np.exp(-((pixels[:, None] - centres[None, :]) ** 2) / (2 * width**2))
    one_d /= one_d.sum(axis=0, keepdims=True)
    return np.asarray(np.kron(one_d, one_d), dtype=np.float64)  # rows: (y, x) pixels in; columns: (y, x) pixels out


def _median_ms(function: Any, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def basics(ranks: Sequence[int], batches: Sequence[int], seed: int, repeats: int) -> None:
    in_modes, out_modes = (4, 7, 7, 4), (4, 4, 4, 4)
    rng = np.random.default_rng(seed)
    matrices = {
        "blur 28x28 -> 16x16": blur_matrix(),
        "gaussian random": rng.normal(0.0, 1.0 / math.sqrt(784), size=(784, 256)),
    }
    print("== 1. Decompose dense 784 x 256 matrices into MPOs (TT-SVD), modes 4x7x7x4 -> 4x4x4x4 ==\n")
    rows = []
    for name, matrix in matrices.items():
        for rank in [*ranks, None]:
            _, report = from_dense(matrix, in_modes, out_modes, max_rank=rank)
            rows.append(
                [
                    name,
                    "exact" if rank is None else rank,
                    report.ranks,
                    f"{report.num_params:,}",
                    f"{report.compression_ratio:.4f}",
                    f"{1 / report.compression_ratio:.1f}x",
                    f"{report.relative_error:.2e}",
                ]
            )
    print(format_table(["matrix", "max rank", "ranks kept", "params", "rho", "compression", "rel. error"], rows))
    print(
        f"\nDense: {784 * 256:,} params. A smooth operator compresses by orders of magnitude at small error;"
        "\na random matrix has no structure to exploit (its error falls only as the bonds approach the maximum).\n"
    )

    spec = MPOSpec(in_modes, out_modes, 8)
    cores = init_cores(spec, "glorot", seed=seed, dtype=np.float32)
    print(f"== 2. Contraction orderings for {spec} (the paper's FC2 layer at D = 8) ==\n")
    print("flops and largest intermediate come from the plan; time is a NumPy forward (median, this machine).\n")
    rows = []
    for batch in batches:
        x = rng.normal(size=(batch, spec.in_features)).astype(np.float32)
        auto_choice = plan(spec, batch, "auto").method
        for strategy in DEMO_STRATEGIES:
            chosen = plan(spec, batch, strategy)
            ms = _median_ms(lambda chosen=chosen, x=x: contract(x, cores, strategy=chosen), repeats)
            label = f"auto ({auto_choice})" if strategy == "auto" else strategy
            rows.append(
                [
                    batch,
                    label,
                    f"{chosen.flops:.3e}",
                    f"{chosen.largest_intermediate:,}",
                    f"{chosen.cost * 1e3:.3g}",
                    f"{ms:.3f}",
                ]
            )
    headers = ["batch", "strategy", "flops", "largest interm.", "model cost", "numpy ms"]
    print(format_table(headers, rows))
    print(f"\nOther strategies: {', '.join(OPT_EINSUM_STRATEGIES)}, or an explicit opt_einsum path.")


def _modes(text: str) -> tuple[int, ...]:
    try:
        modes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        modes = ()
    if not modes or min(modes) < 1:
        raise argparse.ArgumentTypeError(f"modes must be positive ints joined by x, like 4x7x7x4, got {text!r}")
    return modes


def _positive(text: str, minimum: int = 1) -> int:
    """An argparse type: an int of at least 1 (bond dimensions, batch sizes, repeats, epochs)."""
    try:
        number = int(text)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise argparse.ArgumentTypeError(f"expected {'a positive' if minimum else 'a non-negative'} int, got {text!r}")
    return number


def _non_negative(text: str) -> int:
    """An argparse type: an int of at least 0 (seeds)."""
    return _positive(text, minimum=0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tnlayers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,basics,plan}")
    demo_parser = commands.add_parser(
        "demo",
        help="train dense and MPO networks on MNIST, compress, share across frameworks, time orderings, plot",
        description="the showcase: see tnlayers.apps.demo",
    )
    demo_parser.add_argument(
        "--data", help="MNIST folder (default: TNLAYERS_DATA, ../shared/data/mnist, else synthetic)"
    )
    demo_parser.add_argument("--epochs", type=_positive, default=3, help="training epochs per network (default 3)")
    demo_parser.add_argument("--bonds", type=_positive, nargs=2, default=[4, 16], help="two bond dimensions of MPO-FC2")
    demo_parser.add_argument(
        "--batches", type=_positive, nargs="+", default=[1, 32, 1024], help="batch sizes the orderings are timed at"
    )
    demo_parser.add_argument("--repeats", type=_positive, default=7, help="timed repeats per ordering (median)")
    demo_parser.add_argument("--out", default="results", help="folder for the plot, JSON and checkpoint")
    demo_parser.add_argument("--quick", action="store_true", help="3,000 training images and 1 epoch (a smoke run)")
    basics_parser = commands.add_parser(
        "basics", help="NumPy only: decompose dense matrices and compare contraction orderings"
    )
    basics_parser.add_argument(
        "--ranks", type=_positive, nargs="+", default=[1, 2, 4, 8, 16, 32], help="bond caps of the decompositions"
    )
    basics_parser.add_argument(
        "--batches", type=_positive, nargs="+", default=[1, 32, 1024], help="batch sizes the orderings are timed at"
    )
    basics_parser.add_argument("--seed", type=_non_negative, default=0, help="seed of the random inputs")
    basics_parser.add_argument("--repeats", type=_positive, default=7, help="timed repeats per ordering (median)")
    plan_parser = commands.add_parser("plan", help="print the plan of one MPO layer")
    plan_parser.add_argument("in_modes", type=_modes, help="e.g. 4x7x7x4")
    plan_parser.add_argument("out_modes", type=_modes, help="e.g. 4x4x4x4")
    plan_parser.add_argument("--rank", type=_positive, default=8, help="bond dimension cap (default 8)")
    plan_parser.add_argument("--batch", type=_positive, default=32, help="batch size planned for (default 32)")
    plan_parser.add_argument(
        "--strategy",
        default="auto",
        help="auto, autotune, zipper, reverse-zipper, materialize, greedy, dp, optimal, ...",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        epochs = 1 if args.quick else args.epochs
        try:
            from .demo import run_demo

            run_demo(
                args.data, epochs, args.bonds, args.batches, 3 if args.quick else args.repeats, args.out, args.quick
            )
        except ImportError as err:
            parser.exit(
                1, f"tnlayers demo needs the torch and keras extras (pip install 'tnlayers[torch,keras]'): {err}\n"
            )
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    elif args.command == "basics":
        basics(args.ranks, args.batches, args.seed, args.repeats)
    else:
        try:
            spec = MPOSpec(args.in_modes, args.out_modes, args.rank)
            print(plan(spec, args.batch, args.strategy).describe())
        except (TypeError, ValueError) as err:
            parser.error(str(err))
