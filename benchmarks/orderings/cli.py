"""The command line of the orderings benchmark (run it as ``python -m benchmarks.orderings``)."""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

import benchmarks.orderings as package
from benchmarks.records import add_allocator_option, apply_allocator_option
from tnlayers.autotune import Autotuner
from tnlayers.cost import cost_model_for
from tnlayers.layer import DEFAULT_SAVED_BUDGET, check_saved_budget

from .analysis import dense_ratios, fit_cost_model, planner_figures, ratio_table, score_cost_model
from .cases import BATCHES, CASES, MAX_DENSE_FLOPS, ORDERINGS, PLANNERS, QUICK_BATCHES, QUICK_CASES, Case
from .measure import environment, measure_case
from .profiling import overhead, profile
from .report import markdown_summary, overhead_lines, plot
from .runners import RUNNERS, available_backends


def _budget(text: str) -> float | None:
    """``--saved-budget``: a number >= 1, or ``none``."""
    try:
        return None if text.lower() == "none" else check_saved_budget(float(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.orderings",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backends", nargs="+", default=None, help="numpy torch tensorflow jax (default: installed)")
    parser.add_argument("--cases", nargs="+", default=["all"], help="all, paper, square, uneven, or case names")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--orderings", nargs="+", default=list(ORDERINGS))
    parser.add_argument("--modes", nargs="+", default=["forward", "forward+backward"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch / TF intra-op threads")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda (untested here)")
    parser.add_argument(
        "--saved-budget",
        type=_budget,
        default=DEFAULT_SAVED_BUDGET,
        help=f"torch training keeps at most this many input sizes for the backward (default {DEFAULT_SAVED_BUDGET}; "
        "'none': no bound)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/orderings"))
    parser.add_argument("--quick", action="store_true", help="2 cases at batch 1 and 64, 2 repeats (< 60 s)")
    parser.add_argument("--fit", action="store_true", help="fit each backend's CostModel weights to these times")
    parser.add_argument("--no-overhead", action="store_true", help="skip the per-call overhead measurement (torch)")
    parser.add_argument(
        "--from-records", type=Path, default=None, help="summarise / --fit a records.jsonl, timing nothing"
    )
    parser.add_argument(
        "--check-fit",
        type=Path,
        default=None,
        metavar="RECORDS",
        help="with --fit: score the fitted and the current weights on a second run's records.jsonl",
    )
    parser.add_argument(
        "--profile", metavar="CASE", default=None, help="torch: where auto's forward+backward spends its time, per op"
    )
    add_allocator_option(parser)
    return parser


def _selection(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[Case], list[int]]:
    """Backends, cases and batch sizes asked for (an unknown one is a usage error)."""
    backends = args.backends or [b for b in ("numpy", "torch", "tensorflow") if b in available_backends()]
    unknown = [b for b in backends if b not in RUNNERS]
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; expected some of {', '.join(RUNNERS)}")
    missing = [b for b in backends if b not in available_backends()]
    if missing:
        parser.error(f"backend(s) {missing} not installed")
    if args.quick:
        return backends, list(QUICK_CASES), list(QUICK_BATCHES)
    selected = set(args.cases)
    cases = [c for c in CASES if "all" in selected or c.group in selected or c.name in selected]
    if not cases:
        parser.error(f"no case matches {args.cases}")
    return backends, cases, list(args.batches)


def _set_threads(backends: Sequence[str], threads: int | None) -> None:
    if not threads:
        return
    if "torch" in backends:
        import torch

        torch.set_num_threads(threads)
    if "tensorflow" in backends:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)


def _read_records(path: Path, backends: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Earlier measurements of these backends, and the overhead records, from a records.jsonl."""
    records, calls = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["mode"] == "overhead":
            calls.append(record)
        elif record["backend"] in backends:
            records.append(record)
    return records, calls


def _measure(
    args: argparse.Namespace, backends: Sequence[str], cases: Sequence[Case], batches: Sequence[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Time every (backend, case, batch), writing records as they are measured: a long run keeps its part."""
    repeats = 2 if args.quick else args.repeats
    jobs = [
        (b, c, n)
        for b in backends
        for c in cases
        for n in batches
        if 2 * n * c.spec.in_features * c.spec.out_features <= MAX_DENSE_FLOPS
    ]
    gemm = {}
    for backend in tqdm(jobs and backends, desc="GEMM ceilings", leave=False):
        gemm[backend] = RUNNERS[backend](CASES[0].spec, 1, args.dtype, args.device).gemm_gflops(
            1024 if args.quick else 2048
        )
    env = environment(backends, args.threads, args.device, gemm)
    tuner = Autotuner(args.out / "autotune-cache" / "autotune.json")  # autotune starts from nothing here
    tuner.clear(disk=True)
    records: list[dict[str, Any]] = []
    with (args.out / "records.jsonl").open("w") as handle:
        for backend, case, batch in tqdm(jobs, desc="cases"):
            runner = RUNNERS[backend](case.spec, batch, args.dtype, args.device if backend == "torch" else "cpu")
            runner.saved_budget = args.saved_budget
            measured = measure_case(runner, args.orderings, repeats, args.modes, case, tuner)
            measured = [{**record, "saved_budget": args.saved_budget} for record in measured]
            records += measured
            handle.writelines(json.dumps({**record, **env}) + "\n" for record in measured)
            handle.flush()
        calls = [] if args.no_overhead or "torch" not in backends else overhead(3 if args.quick else 9)
        handle.writelines(json.dumps({"mode": "overhead", **record, **env}) + "\n" for record in calls)
    return records, calls, env


def _print_figures(
    records: Sequence[dict[str, Any]],
    backends: Sequence[str],
    fit: bool,
    gemm: dict[str, float],
    check: Sequence[dict[str, Any]] = (),
) -> dict[tuple[str, str], Any]:
    rows = ratio_table(records)
    figures: dict[tuple[str, str], Any] = {}
    for backend in backends:
        subset = [row for row in rows if row["backend"] == backend]
        for contender in (*PLANNERS, *(f"{name} by path" for name in PLANNERS)) if subset else ():  # timed training
            med, geo, worst = planner_figures(subset, contender)
            figures[(backend, contender)] = (med, geo, worst)
            against = "path" if "path" in contender else "ordering"
            print(
                f"{backend:<10} {contender:<16} fwd+bwd time / fastest {against}: "
                f"median {med:.3f}x, geomean {geo:.3f}x, worst {worst:.3f}x over {len(subset)} cases"
            )
        for mode in ("forward+backward", "forward"):
            large = [
                row["efficiency"]
                for row in dense_ratios(records, gemm, mode)
                if row["backend"] == backend and row["batch"] >= 256
            ]
            if large:
                print(f"{backend:<10} auto against dense from batch 256 ({mode}): efficiency median "
                      f"{statistics.median(large):.2f}, worst {min(large):.2f} over {len(large)} cases")  # fmt: skip
        if fit:
            fitted, (med, geo, worst) = fit_cost_model([r for r in records if r["backend"] == backend])
            figures[(backend, "fitted")] = fitted
            print(f"{backend:<10} fitted {fitted}: median {med:.3f}x, geomean {geo:.3f}x, worst {worst:.3f}x")
            held_out = [r for r in check if r["backend"] == backend]
            for name, model in (("fitted", fitted), ("current", cost_model_for(backend))) if held_out else ():
                med, geo, worst = score_cost_model(model, held_out)
                figures[(backend, f"{name} on the second run")] = (med, geo, worst)
                print(f"{backend:<10} {name} weights on the second run, by path: "
                      f"median {med:.3f}x, geomean {geo:.3f}x, worst {worst:.3f}x")  # fmt: skip
    return figures


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = _parser()
    args = parser.parse_args(argv)
    apply_allocator_option(parser, args)
    if args.profile:
        case = next((c for c in CASES if c.name == args.profile), None)
        if case is None:
            parser.error(f"no case named {args.profile!r}; expected one of {', '.join(c.name for c in CASES)}")
        for batch in args.batches:
            print(profile(case, batch, args.dtype, args.device))
        return {}
    backends, cases, batches = _selection(parser, args)
    _set_threads(backends, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_records:  # re-summarise (and refit) earlier measurements, timing nothing
        records, calls = _read_records(args.from_records, backends)
        keys = ("cpu", "cores", "device", "gemm_gflops", "omp_wait_policy", "torch_threads", "allocator")
        env = {k: records[0].get(k) for k in keys} if records else {}
    else:
        records, calls, env = _measure(args, backends, cases, batches)
    summary = markdown_summary(records, env)
    if calls:
        summary += "\n## Per-call overhead\n\n" + "\n".join(overhead_lines(calls)) + "\n"
    (args.out / "summary.md").write_text(summary + "\n")
    paths = plot(records, args.out)
    print()
    if calls:
        print("\n".join(overhead_lines(calls)) + "\n")
    check = _read_records(args.check_fit, backends)[0] if args.check_fit else []
    figures = _print_figures(records, backends, args.fit, env.get("gemm_gflops") or {}, check)
    print(
        f"\n{'read' if args.from_records else 'wrote'} {len(records)} records; wrote {args.out / 'summary.md'}, "
        + ", ".join(str(p) for p in paths)
    )
    return {"records": records, "environment": env, "figures": figures, "overhead": calls}
