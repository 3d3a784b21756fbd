"""Paired timing for "ours vs eager" rows, shared by the CPU benchmarks.

Each round times a batch of each callable back to back, the order alternating between rounds,
so a slow stretch of a shared machine falls on both sides of a ratio alike; the reported ratio
is the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def batch_seconds(fn: Callable[[], object], number: int) -> float:
    """Seconds per call of ``fn`` over ``number`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def paired(
    ours: Callable[[], object],
    eager: Callable[[], object],
    *,
    rounds: int,
    batch_s: float = 0.0,
    number: int | None = None,
) -> tuple[float, float, float]:
    """Median seconds per call of ``ours`` and ``eager``, and the median of per-round ratios.

    Each batch runs for about ``batch_s`` seconds, or exactly ``number`` calls when given (then
    ``ours`` runs ``1 + rounds * number`` times in all, the first a warm-up: for callables that
    consume a finite supply, such as distinct signed commands)."""
    ours(), eager()  # warm up both
    if number is None:
        once = max(batch_seconds(ours, 1), batch_seconds(eager, 1), 1e-6)
        number = max(1, min(200, int(batch_s / once)))
    a, b, ratios = [], [], []
    for i in range(rounds):
        if i % 2:
            e, o = batch_seconds(eager, number), batch_seconds(ours, number)
        else:
            o, e = batch_seconds(ours, number), batch_seconds(eager, number)
        a.append(o)
        b.append(e)
        ratios.append(o / e)
    return statistics.median(a), statistics.median(b), statistics.median(ratios)


def record_versus(
    benchmark: Any,
    ours: Callable[[], object],
    eager: Callable[[], object],
    *,
    target: str,
    what: str,
    rounds: int,
    batch_s: float,
) -> None:
    """Benchmark ``ours`` and record ``ours/eager`` from a paired run in the target line."""
    benchmark(ours)
    ours_s, eager_s, ratio = paired(ours, eager, rounds=rounds, batch_s=batch_s)
    benchmark.extra_info.update(
        {"ours_us": round(ours_s * 1e6, 3), "eager_us": round(eager_s * 1e6, 3), "ratio": ratio}
    )
    benchmark.extra_info["target"] = (
        f"{target}: ours/eager = {ratio:.2f} (median of {rounds} paired rounds; medians "
        f"{ours_s * 1e6:.1f} us / {eager_s * 1e6:.1f} us; {what})"
    )
