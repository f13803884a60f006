"""What a run writes: the Markdown summary, the overhead table and the plots."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tnlayers

from .analysis import dense_ratios, planner_figures, ratio_table
from .cases import BASELINES, CASES, ORDERINGS


def overhead_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    header = (
        "| case (batch 1, torch, no_grad) | plan | layer forward us | execute us | bare einsum chain us | "
        "checks + plan lookup us | layer - bare chain, / bare chain |"
    )
    lines = [header, "|---|---|---|---|---|---|---|"]
    for r in records:
        cells = [
            r["case"],
            r["method"],
            f"{r['layer forward']:.1f}",
            f"{r['execute (cached plan)']:.1f}",
            f"{r['bare torch.einsum chain']:.1f}",
            f"{r['dispatch_us']:.1f}",
            f"{r['overhead_us']:.1f} us, {r['overhead_vs_contraction']:+.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def dense_lines(
    records: Sequence[dict[str, Any]], gemm_gflops: dict[str, float], backend: str, mode: str = "forward+backward"
) -> list[str]:
    """``auto`` against the dense layer, per case (in ``mode``), and the efficiency from batch 256 up."""
    rows = [row for row in dense_ratios(records, gemm_gflops, mode) if row["backend"] == backend]
    if not rows:
        return []
    large = sorted(row["efficiency"] for row in rows if row["batch"] >= 256)
    lines = [f"`auto` against the dense layer holding the same W ({mode}, same round):", ""]
    if large:
        lines += [f"- from batch 256 up: efficiency median {statistics.median(large):.2f}, worst {large[0]:.2f} "
                  f"over {len(large)} cases", ""]  # fmt: skip
    lines += ["| case | batch | auto chose | flops vs dense | x dense | efficiency | % of GEMM ceiling |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['batch']} | {row['method']} | {row['flops vs dense']:.2f} | "
            f"{row['x dense']:.2f} | {row['efficiency']:.2f} | {row['% of GEMM']:.0f} |"
        )
    return [*lines, ""]


def memory_lines(records: Sequence[dict[str, Any]], backend: str) -> list[str]:
    """Saved-for-backward bytes of ``auto`` as x the dense layer's, with the bound and without it."""
    train = [r for r in records if r["backend"] == backend and r["mode"] == "forward+backward"]
    dense = {(r["case"], r["batch"]): r.get("memory_bytes") for r in train if r["ordering"] == "dense"}
    rows = [
        (r, dense[(r["case"], r["batch"])])
        for r in train
        if r["ordering"] == "auto" and r.get("memory_bytes_unbounded") and dense.get((r["case"], r["batch"]))
    ]
    if not rows:
        return []
    budget = rows[0][0].get("saved_budget")
    over = [(r["memory_bytes"] / d, r["memory_bytes_unbounded"] / d) for r, d in rows if r["batch"] >= 32]
    lines = [
        f"Saved for the backward by `auto` (x the dense layer's, which keeps its input), with the bound "
        f"`saved_budget={budget}` and without it (`None`, what autograd alone keeps):",
        "",
        f"- from batch 32 up, above 1.5x dense: {sum(b > 1.5 for b, _ in over)} of {len(over)} cases with the "
        f"bound, {sum(u > 1.5 for _, u in over)} without it; worst {max(b for b, _ in over):.2f}x and "
        f"{max(u for _, u in over):.2f}x",
        "",
        "| case | batch | auto chose | saved x dense (bound) | saved x dense (no bound) |",
        "|---|---|---|---|---|",
    ]
    for r, d in rows:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['method']} | {r['memory_bytes'] / d:.2f} | "
            f"{r['memory_bytes_unbounded'] / d:.2f} |"
        )
    return [*lines, ""]


def markdown_summary(records: Sequence[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [f"# Contraction orderings on {env['cpu']} ({env['cores']} cores, {env['device']})", ""]
    lines.append("Time / the fastest ordering of that case (forward+backward, median of round-robin repeats).")
    lines.append(
        "`by path`: the planner's path against the fastest path, a path's time being the median over every "
        "contender that ran that same path (so the fastest is not the luckiest of a dozen noisy medians)."
    )
    lines.append(
        "GEMM ceiling measured here (GFLOP/s): " + ", ".join(f"{k} {v:.0f}" for k, v in env["gemm_gflops"].items())
    )
    lines.append(
        f"OMP_WAIT_POLICY {env.get('omp_wait_policy') or 'unset'}, torch threads {env.get('torch_threads', 'n/a')}, "
        f"allocator {env.get('allocator') or 'default'}."
    )
    lines.append("")
    rows = ratio_table(records)
    for backend in sorted({r["backend"] for r in records}):
        subset = [row for row in rows if row["backend"] == backend]
        lines.append(f"## {backend}")
        lines.append("")
        example = tnlayers.report(CASES[3].spec, 1024, backend=backend)  # what the planner sees, per strategy
        lines += ["`tnlayers.report` of the paper's FC2 layer at D = 16, batch 1024:", ""]
        lines += ["```", str(example), "```", ""]
        for contender in ("auto", "autotune", "auto by path", "autotune by path", *BASELINES):
            med, geo, worst = planner_figures(subset, contender)
            if not math.isnan(med):
                against = "path" if "path" in contender else "ordering"
                lines.append(
                    f"- `{contender}`: median {med:.2f}x, geometric mean {geo:.2f}x, worst {worst:.2f}x of the "
                    f"fastest {against} over {sum(contender in r for r in subset)} cases"
                )
        lines.append("")
        for mode in ("forward+backward", "forward"):
            lines += dense_lines(records, env.get("gemm_gflops", {}), backend, mode)
        lines += memory_lines(records, backend)
        columns = [c for c in (*ORDERINGS, *BASELINES) if any(c in r for r in subset)]
        if not subset:  # a forward-only run: no training table
            continue
        lines.append("| case | batch | fastest | ms | auto chose | " + " | ".join(columns) + " |")
        lines.append("|---|---|---|---|---|" + "---|" * len(columns))
        for row in subset:
            cells = [f"{row[c]:.2f}" if c in row else "" for c in columns]
            lines.append(
                f"| {row['case']} | {row['batch']} | {row['fastest']} | {row['fastest_ms']:.3f} | "
                f"{row['auto_chose']} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Time against batch size per ordering (a few cases), and measured time against the model's cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    train = [r for r in records if r["mode"] == "forward+backward"]
    backends = sorted({r["backend"] for r in train})
    cases = list(dict.fromkeys(r["case"] for r in train))[:4]
    if not train:  # a forward-only run: no training times to plot
        return paths
    figure, axes = plt.subplots(
        len(backends), len(cases), figsize=(4.2 * len(cases), 3.4 * len(backends)), squeeze=False
    )
    for row, backend in enumerate(backends):
        for column, case in enumerate(cases):
            ax = axes[row][column]
            subset = [r for r in train if r["backend"] == backend and r["case"] == case]
            for name in dict.fromkeys(r["ordering"] for r in subset):
                points = sorted((r["batch"], 1e3 * r["median_s"]) for r in subset if r["ordering"] == name)
                style = "--" if name in BASELINES else "-"
                ax.plot(
                    *zip(*points), style, marker="o", markersize=3, label=name, linewidth=2.5 if name == "auto" else 1
                )
            ax.set(xscale="log", yscale="log", title=f"{backend}: {case}", xlabel="batch", ylabel="ms (fwd+bwd)")
    axes[0][-1].legend(fontsize=6)
    figure.tight_layout()
    paths.append(out / "time_vs_batch.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    figure, axes = plt.subplots(1, len(backends), figsize=(4.5 * len(backends), 4), squeeze=False)
    for column, backend in enumerate(backends):
        points = [
            (r["model_cost"], r["median_s"])
            for r in records
            if r["backend"] == backend and r["mode"] == "forward" and r["model_cost"]
        ]
        ax = axes[0][column]
        if not points:  # a run without the forward mode has no forward costs to compare
            ax.set_axis_off()
            continue
        ax.scatter(*zip(*points), s=6, alpha=0.6)
        ax.set(
            xscale="log", yscale="log", title=f"{backend}: forward", xlabel="cost model (units)", ylabel="measured s"
        )
    figure.tight_layout()
    paths.append(out / "measured_vs_model.png")
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths
