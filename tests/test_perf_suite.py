"""The benchmarks in ``perf/`` run: each once, at the smallest pytest-benchmark settings.

``make bench`` is not part of ``make test``, so a change that broke a benchmark's set-up went
unseen (GERMINATE refused before a slot's first forward: every round of the end-to-end
GERMINATE benchmark failed). Each benchmark checks what it times (every command dispatched,
every seed grown); the speeds are neither kept nor asserted here. The scripts' own contracts are
checked beside it: a GPU-table peer does the work ours does, gpu_check.sh's install check, and
the standalone scripts' argument checks.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kasmina.ops import alpha_blend

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


@pytest.mark.parametrize("chunks", [0, 8])
def test_gpu_table_eager_blend_peer_keeps_the_data_dtype(
    monkeypatch: pytest.MonkeyPatch, chunks: int
) -> None:
    """The GPU table's eager alpha-blend peer blends in the data's dtype, as ours does: an fp32
    per-chunk alpha promoted its output and backward to fp32, twice the bytes ours moves, so the
    ratio against it flattered ours."""
    monkeypatch.syspath_prepend(str(ROOT / "perf"))
    eager_blend = importlib.import_module("bench_gpu")._eager_blend
    seed = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    host = torch.randn(4, 16, dtype=torch.bfloat16)
    alpha = (torch.rand(chunks) if chunks else torch.tensor(0.3)).requires_grad_()
    eager = eager_blend(seed, host, alpha)
    assert eager.dtype == alpha_blend(seed, host, alpha).dtype == torch.bfloat16
    torch.testing.assert_close(eager, alpha_blend(seed, host, alpha), atol=2e-2, rtol=2e-2)


def test_gpu_check_install_passes_without_an_extras_package() -> None:
    """``perf/import_check.py``, ``perf/gpu_check.sh``'s install check, passes on a GPU image
    without aiohttp (the dev extra's; only HTTP stores need it), with a note: it stopped
    gpu_check.sh at exit 3, before any CUDA test ran."""
    code = (
        "import runpy, sys; sys.modules['aiohttp'] = None; "  # None: its import raises
        "runpy.run_path('perf/import_check.py', run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped kasmina.urza.redirects: aiohttp is not installed" in result.stdout


def test_bench_models_refuses_a_count_below_one() -> None:
    """``perf/bench_models.py --repeat 0`` is refused by argparse with a usage message, as the other
    scripts' counts are (``perf/arguments.py``), where it ran on into an empty median."""
    result = subprocess.run(
        [sys.executable, "perf/bench_models.py", "--repeat", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "expected an integer >= 1, got 0" in result.stderr
