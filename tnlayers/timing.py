"""Round-robin timing: every contender runs in turn, repeat after repeat, on the same machine state.

Used by the benchmarks, the demo and ``strategy="autotune"``. Time ratios measured side by side in
one run are far steadier than absolute times on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["calls_per_sample", "median", "round_robin"]


def round_robin(
    contenders: Mapping[str, Callable[[], object]], repeats: int, inner: int = 1, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each contender, one entry per repeat (each the mean of ``inner`` calls)."""
    for run in contenders.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
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


def median(samples: list[float]) -> float:
    return statistics.median(samples)
