"""Latencies the kernel manager measures on itself, and the docs/design.md §8 targets to
compare them with.

Why a bounded window: the median of the recent past is what a target is about (and what a
regression moves); a window keeps memory constant however long training runs, while the running
count and mean cover the whole run.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

__all__ = ["DESIGN_TARGETS_US", "LatencyStats"]

# docs/design.md §8 (CPU): metric name -> upper bound in microseconds.
DESIGN_TARGETS_US: dict[str, float] = {
    "command_overhead_p50_us": 20.0,  # authenticated parse + verify + validate + dispatch
    "cache_hit_p50_us": 2.0,
    "dormant_overhead_us": 10.0,  # dormant-seed forward overhead over the bare host layer
}


class LatencyStats:
    """Durations in nanoseconds: the last ``window`` for percentiles, count and mean for all."""

    def __init__(self, window: int = 1024) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._recent: deque[int] = deque(maxlen=window)
        self.count = 0
        self._total_ns = 0

    def add_ns(self, duration_ns: int) -> None:
        self._recent.append(duration_ns)
        self.count += 1
        self._total_ns += duration_ns

    def _median_ns(self) -> float:
        return float(statistics.median(self._recent)) if self._recent else math.nan

    @property
    def p50_us(self) -> float:
        return self._median_ns() / 1e3

    @property
    def p50_ms(self) -> float:
        return self._median_ns() / 1e6

    @property
    def mean_ms(self) -> float:
        return self._total_ns / self.count / 1e6 if self.count else math.nan

    @property
    def last_ms(self) -> float:
        return self._recent[-1] / 1e6 if self._recent else math.nan
