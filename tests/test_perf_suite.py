"""The benchmarks in ``perf/`` run: each once, at the smallest pytest-benchmark settings.

``make bench`` is not part of ``make test``, so a change that broke a benchmark's set-up went
unseen (GERMINATE refused before a slot's first forward: every round of the end-to-end
GERMINATE benchmark failed). Each benchmark checks what it times (every command dispatched,
every seed grown); the speeds are neither kept nor asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_runs() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env["KASMINA_BACKEND"] = "reference"  # the CPU path `make bench` times without a GPU
    command = [
        sys.executable, "-m", "pytest", "perf", "-q", "-p", "no:cacheprovider",
        "--benchmark-only", "--benchmark-max-time=0.001", "--benchmark-min-rounds=1",
        "--benchmark-warmup=off",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
