"""Tensor-network diagrams of an MPO, and of a plan's contraction order: matplotlib and ASCII.

Input legs ``i_k`` point up (towards the input ``x`` when a plan is drawn), output legs ``j_k``
point down, bonds run left to right labelled with their dimension. A plan's steps are numbered on
the edges each step contracts. matplotlib is imported only by :func:`draw`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .decompose import cores_of, spec_from_cores
from .plan import ContractionPlan, contraction_steps, step_lines
from .spec import MPOSpec

__all__ = ["contraction_steps", "draw", "draw_ascii"]


def _spec_of(source: Any) -> MPOSpec:
    if isinstance(source, MPOSpec):
        return source
    if isinstance(source, ContractionPlan):
        return source.spec
    spec = getattr(source, "spec", None)
    if isinstance(spec, MPOSpec):
        return spec
    return spec_from_cores(cores_of(source))


def draw_ascii(source: Any, plan: ContractionPlan | None = None) -> str:
    """The MPO as text: legs with their mode sizes, cores ``[Gk]``, bonds with their dimension.

    With a ``plan``, the steps follow as a numbered list of what each one contracts.
    """
    spec = plan.spec if plan is not None else _spec_of(source)
    n = spec.n_cores
    tops = [f"i{k + 1}={m}" for k, m in enumerate(spec.in_modes)]
    bottoms = [f"j{k + 1}={m}" for k, m in enumerate(spec.out_modes)]
    boxes = [f"[G{k + 1}]" for k in range(n)]
    bonds = [f"--{r}--" for r in spec.ranks[1:-1]]
    width = [max(len(t), len(b), len(x)) for t, b, x in zip(tops, bottoms, boxes)]
    gaps = [len(b) for b in bonds] + [0]
    rows = ["", "", "", "", ""]
    for k in range(n):
        w = width[k]
        rows[0] += tops[k].center(w) + " " * gaps[k]
        rows[1] += "|".center(w) + " " * gaps[k]
        rows[2] += boxes[k].center(w, "-" if 0 < k < n else " ") + (bonds[k] if k < n - 1 else "")
        rows[3] += "|".center(w) + " " * gaps[k]
        rows[4] += bottoms[k].center(w) + " " * gaps[k]
    lines = [row.rstrip() for row in rows]
    if plan is not None:
        lines.append("")
        lines.append(f"{plan.strategy} -> {plan.method} at batch {plan.batch_size}: {plan.flops:,} flops")
        lines += [f"  {line}" for line in step_lines(plan)]
    return "\n".join(lines)


def draw(source: Any, plan: ContractionPlan | None = None, ax: Any = None, title: str | None = None) -> Any:
    """Draw the MPO (a spec, cores or a layer) with matplotlib; with a ``plan``, also the input
    ``x`` and the plan's steps numbered on the edges they contract. Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    spec = plan.spec if plan is not None else _spec_of(source)
    n = spec.n_cores
    if ax is None:
        _, ax = plt.subplots(figsize=(1.7 * n + 1.2, 3.6 if plan is not None else 2.6))
    xs = np.arange(n) * 1.7
    box_w, box_h, leg = 0.7, 0.5, 0.75
    x_level = box_h / 2 + leg + 0.35
    for k, x in enumerate(xs):
        ax.add_patch(
            FancyBboxPatch(
                (x - box_w / 2, -box_h / 2), box_w, box_h, boxstyle="round,pad=0.04", fc="#cfe2f3", ec="#1f4e79"
            )
        )
        ax.text(x, 0, f"G{k + 1}", ha="center", va="center", fontsize=11, weight="bold")
        top = x_level - 0.2 if plan is not None else box_h / 2 + leg
        ax.plot([x, x], [box_h / 2, top], color="#1f4e79")
        ax.text(x + 0.06, box_h / 2 + 0.3, f"i{k + 1}={spec.in_modes[k]}", fontsize=9, color="#7f6000")
        ax.plot([x, x], [-box_h / 2, -box_h / 2 - leg], color="#1f4e79")
        ax.text(x, -box_h / 2 - leg - 0.15, f"j{k + 1}={spec.out_modes[k]}", ha="center", va="top", fontsize=9)
        if k < n - 1:
            ax.plot([x + box_w / 2, xs[k + 1] - box_w / 2], [0, 0], color="#1f4e79", lw=2)
            ax.text((x + xs[k + 1]) / 2, 0.08, f"D={spec.ranks[k + 1]}", ha="center", va="bottom", fontsize=9)
    if plan is not None:
        ax.add_patch(
            FancyBboxPatch(
                (xs[0] - box_w / 2, x_level - 0.2),
                xs[-1] - xs[0] + box_w,
                0.4,
                boxstyle="round,pad=0.04",
                fc="#fce5cd",
                ec="#b45f06",
            )
        )
        ax.text((xs[0] + xs[-1]) / 2, x_level, f"x  (batch {plan.batch_size})", ha="center", va="center")
        for number, (_, _, edges) in enumerate(contraction_steps(plan), start=1):
            for edge in edges:
                k = int(edge[1:]) - 1
                if edge[0] == "i":
                    where = (xs[k] - 0.18, (box_h / 2 + x_level - 0.2) / 2)
                else:
                    where = ((xs[k] + xs[k + 1]) / 2, -0.22)
                ax.text(
                    *where,
                    str(number),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="white",
                    bbox={"boxstyle": "circle,pad=0.25", "fc": "#cc0000", "ec": "none"},
                )
        if title is None:
            chosen = plan.method if plan.strategy == plan.method else f"{plan.strategy} -> {plan.method}"
            title = f"{chosen} at batch {plan.batch_size}: {plan.flops:,} flops (red: step numbers)"
    ax.set_title(title if title is not None else str(spec), fontsize=10)
    ax.set_xlim(xs[0] - 1.0, xs[-1] + 1.0)
    ax.set_ylim(-box_h / 2 - leg - 0.6, (x_level + 0.4) if plan is not None else box_h / 2 + leg + 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax
