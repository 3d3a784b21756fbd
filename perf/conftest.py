"""Shared benchmark reporting: print each benchmark's docs/design.md §8 target beside its number.

A benchmark that puts a ``"target"`` string in ``benchmark.extra_info`` gets it printed beside
its measured median and minimum at the end of the run. Speeds are reported, never asserted.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def smoke(request: pytest.FixtureRequest) -> bool:
    """Whether the run only checks that each benchmark runs (``--benchmark-max-time`` under
    10 ms, as ``tests/test_perf_suite.py`` asks): the paired measurements then take a few
    rounds, not the many their numbers need (the suite's slowest test, else)."""
    max_time = request.config.getoption("benchmark_max_time", default=None)
    return max_time is not None and float(max_time) < 0.01


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)  # pytest-benchmark's session, if active
    rows = []
    for bench in getattr(session, "benchmarks", None) or []:
        target = bench.extra_info.get("target")
        stats = getattr(bench, "stats", None)
        if target and stats is not None:
            rows.append((bench.name, stats.median * 1e6, stats.min * 1e6, target))
    if not rows:
        return
    terminalreporter.section("docs/design.md §8 targets (measured here, never asserted)")
    width = max(len(r[0]) for r in rows)
    for name, median_us, min_us, target in rows:
        terminalreporter.write_line(
            f"{name:<{width}}  median {median_us:10.3f} us  min {min_us:10.3f} us  target: {target}"
        )
