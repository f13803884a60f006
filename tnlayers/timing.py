"""Round-robin timing: every contender runs in turn, repeat after repeat, on the same machine state.

Used by the benchmarks, the demo and ``strategy="autotune"``. Time ratios measured side by side in
one run are far steadier than absolute times on a shared machine. The order is shuffled every
repeat (seeded): a contender that runs right after a memory-hungry one pays for the caches and
pages that one evicted (measured here: 1.5-2x on a 2 ms call after a 40 ms one), and a fixed
order would charge that to the same contender every time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

__all__ = ["calls_per_sample", "round_robin"]


def round_robin(
    contenders: Mapping[str, Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each contender, one entry per repeat (each the mean of ``inner`` calls).

    Every repeat runs all contenders once, in an order shuffled by ``random.Random(seed)``.
    """
    for run in contenders.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            run = contenders[name]
            start = time.perf_counter()
            for _ in range(inner):
                run()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def calls_per_sample(run: Callable[[], object], target_s: float = 2e-3) -> int:
    """How many calls make one timed sample of about ``target_s`` (so short calls are not all noise)."""
    start = time.perf_counter()
    run()
    once = max(time.perf_counter() - start, 1e-7)
    return max(1, min(1000, round(target_s / once)))
