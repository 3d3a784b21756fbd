"""Running ``perf/bench_gpu.py --smoke`` from a test: the GPU table's rows at tiny sizes on the
CPU (the kernels interpreted), so a bug in the benchmark shows without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def gpu_bench_smoke_rows(ops: str, tmp_path: Path) -> list[dict[str, Any]]:
    """The rows ``bench_gpu.py --smoke --ops <ops>`` writes, each checked to have been timed
    and to match its float64 check."""
    out = tmp_path / "table.json"
    env = {k: v for k, v in os.environ.items() if k not in ("KASMINA_BACKEND", "TRITON_INTERPRET")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "bench_gpu.py", "--smoke", "--ops", ops, "--json", str(out)],
        cwd=ROOT / "perf", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for row in rows:
        assert row["ms"] is not None and row["wall_ms"] is not None, row
        assert "MISMATCH" not in row["note"] and "error" not in row["note"], row
    return rows
