"""The grid of the orderings benchmark: layer shapes, bond dimensions, batch sizes and contenders."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import tnlayers
from tnlayers.plan import candidate_optimizers

#: The orderings ``auto`` chooses among: the core's one table (tnlayers.plan.candidate_optimizers).
AUTO_CHOICES = tuple(name for name, _ in candidate_optimizers(6))
PLANNERS = ("auto", "autotune")
ORDERINGS = (*AUTO_CHOICES, "cotengra", *PLANNERS)
BASELINES = ("dense", "tltorch-blocktt", "tn_keras")
BATCHES = (1, 8, 64, 256, 1024, 4096)
QUICK_BATCHES = (1, 64)
MAX_DENSE_FLOPS = 2e10
"""Cases whose dense forward exceeds this many flops are skipped (4096 x 4096 at batch >= 1024)."""


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    rank: int

    @property
    def spec(self) -> tnlayers.MPOSpec:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tnlayers.RankClippedWarning)
            return tnlayers.MPOSpec(self.in_modes, self.out_modes, self.rank)


def _cases() -> list[Case]:
    cases = [Case(f"FC2 784->256 D{d}", "paper", (4, 7, 7, 4), (4, 4, 4, 4), d) for d in (2, 4, 8, 16, 22)]
    cases += [
        Case("LeNet conv3 400->120", "paper", (2, 10, 10, 2), (2, 5, 6, 2), 4),
        Case("LeNet fc 120->84", "paper", (2, 5, 6, 2), (2, 3, 7, 2), 4),
        Case("LeNet fc 84->10", "paper", (2, 3, 7, 2), (1, 5, 2, 1), 2),
        Case("VGG conv-as-MPO 2048", "paper", (2, 8, 8, 8, 2), (2, 8, 8, 8, 2), 4),
        Case("VGG fc 512->4096", "paper", (4, 4, 4, 4, 2), (4, 4, 8, 8, 4), 4),
        Case("VGG fc 4096->4096", "paper", (4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 4),
    ]
    square = [(8, 16, 8), (4, 8, 8, 4), (4,) * 5, (2, 4, 4, 4, 4, 2)]  # 3 to 6 cores
    for modes in square:
        for rank in (4, 16, 64):
            cases.append(Case(f"1024 {'x'.join(map(str, modes))} D{rank}", "square", modes, modes, rank))
    big = [(16, 16, 16), (8, 8, 8, 8), (4,) * 6]
    for modes in big:
        for rank in (8, 32):
            cases.append(Case(f"4096 {'x'.join(map(str, modes))} D{rank}", "square", modes, modes, rank))
    cases += [
        Case("uneven 3072->512 D8", "uneven", (4, 8, 12, 8), (2, 4, 8, 8), 8),
        Case("uneven 1000->300 D16", "uneven", (10, 10, 10), (5, 6, 10), 16),
        Case("uneven 4096->64 D16", "uneven", (8, 8, 8, 8), (2, 2, 4, 4), 16),
        Case("uneven 64->4096 D16", "uneven", (2, 2, 4, 4), (8, 8, 8, 8), 16),
    ]
    return cases


CASES = _cases()
QUICK_CASES = [CASES[1], CASES[5]]
