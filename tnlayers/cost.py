"""Cost models: what a contraction plan is estimated to cost on a backend, so ``auto`` can rank plans.

A :class:`CostModel` is a frozen set of weights (GEMM peak, bandwidth, per-step and threading
overheads). :data:`COST_MODELS` holds the weights fitted per backend; each entry says which run
it comes from. Refit them for other hardware with ``python -m benchmarks.orderings --fit``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import ContractionPlan

__all__ = ["COST_MODELS", "DEFAULT_COST_MODEL", "CostModel", "cost_model_for", "thread_wake_seconds"]


@dataclass(frozen=True)
class CostModel:
    """Estimated cost of a plan: per step, GEMM time at a shape-dependent efficiency plus memory traffic.

    ``time = overhead + 2*M*N*K / (peak_flops * e(M) * e(N) * e(K)) + (|A| + |B| + |C|) / bandwidth``
    with ``e(d) = d / (d + half_size)``: small matrix dimensions run far below the GEMM peak.
    ``bandwidth`` is an effective figure (elements per second) that also stands for the transposes
    and copies a framework makes around each product. A product with ``M*N*K >= parallel_threshold``
    also pays ``parallel_overhead``: the BLAS splits it across threads, and waking them costs time
    (about 90 us per product on a 2-vCPU VM with ``OMP_WAIT_POLICY=PASSIVE``, where MKL's sgemm goes
    parallel from ``M*N*K`` of about 1.9e5). The defaults were fitted on a 2-core x86 CPU
    (float32; torch forward+backward and NumPy forward over 32 layer shapes and batch sizes).
    """

    peak_flops: float = 4e10
    bandwidth: float = 1e8
    half_size: float = 16.0
    step_overhead: float = 2e-5
    tolerance: float = 0.0
    """``auto`` takes the fewest-flops plan among those estimated within this fraction of the cheapest:
    where the model cannot tell plans apart, less arithmetic is the safer bet."""
    parallel_threshold: float = math.inf
    """``M*N*K`` from which a product runs multi-threaded (``inf``: the model ignores threading)."""
    parallel_overhead: float = 0.0
    """Seconds a multi-threaded product pays to start its threads."""
    fitted: bool = False
    """Whether the weights were fitted to this backend's measured times, so that an estimate may be compared
    with one plain product's (a kept ``W``, :meth:`tnlayers.layer.LayerPlanner.reuses_weight`); the default
    weights only rank plans."""
    planned_step_overhead: float = 0.0
    """Seconds per step that training adds when the bound on what it keeps sends a plan through the planned
    backward (:func:`tnlayers.layer.training_cost`): that backward's own work per product, beside the steps
    it recomputes."""

    def choose(self, plans: Sequence[ContractionPlan]) -> ContractionPlan:
        """The plan ``auto`` runs: the fewest flops among those costed within ``tolerance`` of the cheapest.

        Then the lowest cost; plans the model cannot tell apart (costs equal to 9 digits, as when two
        paths have the same step sizes) go to the first in ``plans``, not to the last bit of rounding.
        """
        return plans[self.choose_index([p.cost for p in plans], [p.flops for p in plans])]

    def choose_index(self, costs: Sequence[float], flops: Sequence[int]) -> int:
        """:meth:`choose` on bare numbers: the index of the plan it picks (also used to fit the model)."""
        cheapest = min(costs)
        near = [k for k, cost in enumerate(costs) if cost <= cheapest * (1 + self.tolerance)]
        return min(near, key=lambda k: (flops[k], float(f"{costs[k]:.9g}")))

    def step_cost(self, m: int, n: int, k: int, elements_moved: int) -> float:
        def efficiency(d: int) -> float:
            return d / (d + self.half_size)

        gemm = 2.0 * m * n * k / (self.peak_flops * efficiency(m) * efficiency(n) * efficiency(k))
        threads = self.parallel_overhead if m * n * k >= self.parallel_threshold else 0.0
        return self.step_overhead + gemm + threads + elements_moved / self.bandwidth

    def bound_cost(self, n_steps: int, recomputed: Sequence[tuple[int, int, int, int]] | None) -> float:
        """What training under a bound on what it keeps adds to a plan of ``n_steps`` steps: nothing where
        autograd's backward runs it (``recomputed`` is ``None``), else the planned backward's work per step
        and the products it runs again (``recomputed``: their sizes, as in :meth:`estimate`)."""
        if recomputed is None:
            return 0.0
        return n_steps * self.planned_step_overhead + sum(self.step_cost(*sizes) for sizes in recomputed)

    def estimate(
        self,
        step_sizes: Sequence[tuple[int, int, int, int]],
        grad_inputs: Sequence[tuple[bool, bool]] | None = None,
    ) -> float:
        """The cost of a plan from its ``step_sizes`` (so a plan can be re-scored under another model).

        With ``grad_inputs`` (per step, whether each of its two inputs needs a gradient) the backward
        pass is added: one more product of the step's size per input that needs a gradient.
        """
        forward = sum(self.step_cost(*sizes) for sizes in step_sizes)
        if grad_inputs is None:
            return forward
        return forward + sum(self.step_cost(*sizes) * (a + b) for sizes, (a, b) in zip(step_sizes, grad_inputs))


DEFAULT_COST_MODEL = CostModel()
"""The first fit: torch forward+backward and NumPy forward times over 32 layer shapes and batch sizes (float32,
2-core x86; benchmarks/README.md). NumPy keeps it; it ranked NumPy plans within 1.07x of the fastest (median)."""


#: Per backend. torch: ``python -m benchmarks.orderings --fit`` on one shuffled 183-case forward+backward
#: run (float32, 2-core x86, OMP_WAIT_POLICY=PASSIVE), checked on a second run; its GEMM peak and bandwidth
#: came out near the measured 311-344 GFLOP/s and 8 GB/s, and ``parallel_overhead`` near the ~90 us timed
#: for one multi-threaded product under PASSIVE (benchmarks/results/orderings/torch-summary.md); the
#: wait policy of this process picks the overhead term (:func:`thread_wake_seconds`). ``tolerance`` and
#: ``planned_step_overhead`` from three 72-case runs at the default wait policy with the bound on training
#: memory (2026-11-30, ``--fit --check-fit``): each run's fit gave 2.5e-4 s, and the pair picked paths
#: closer to the fastest than before on every run, forward and forward+backward (docs/benchmarks.md).
#: ``parallel_threshold``: MKL's sgemm went multi-threaded from M*N*K ~ 1.9e5 over 250 random shapes.
#: tensorflow and jax have not been fitted and use the default.
def thread_wake_seconds(wait_policy: str | None) -> float:
    """What a multi-threaded BLAS product pays to start its threads under ``OMP_WAIT_POLICY``: about 90 us
    under PASSIVE (sleeping threads), about 1 us with the default spin-wait (a 64x64x64 product took
    6 us on one thread; 86 us on two under PASSIVE, 7 us by default; 2-core x86, torch 2.13)."""
    return 9e-5 if (wait_policy or "").upper() == "PASSIVE" else 1e-6


COST_MODELS: dict[str, CostModel] = {
    "numpy": DEFAULT_COST_MODEL,
    "torch": CostModel(
        peak_flops=3.2e11,
        bandwidth=2e9,
        half_size=1,
        step_overhead=1e-5,
        tolerance=0.03,
        parallel_threshold=1.9e5,
        parallel_overhead=thread_wake_seconds(os.environ.get("OMP_WAIT_POLICY")),  # read once, at import
        fitted=True,
        # fitted with the bound: the planned backward's Python alone took 65-75 us per step more than
        # autograd's (4-core layers, batch 32); the rest stands for what the steps' sizes do not show of it
        planned_step_overhead=2.5e-4,
    ),
    "tensorflow": DEFAULT_COST_MODEL,
    "jax": DEFAULT_COST_MODEL,
}


def cost_model_for(backend: str) -> CostModel:
    """The calibrated :class:`CostModel` of ``backend`` (numpy, torch, tensorflow, jax), else the default."""
    return COST_MODELS.get(backend, DEFAULT_COST_MODEL)
