"""``shutdown_process_group``: a rank's gloo workers are gone before the interpreter finalizes.

A gloo worker that releases a collective's tensors during interpreter finalization cannot take
the GIL and aborts the process (intermittently, after a run that succeeded). The deterministic
symptom checked here is the cause: the group's worker threads still running after the call.
Each case runs in a fresh interpreter, so no process group leaks into the test session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kasmina.control.processes import find_free_port

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    import torch
    from torch import nn
    from kasmina.control.processes import init_from_env, shutdown_process_group
    from kasmina.manager.ddp import wrap_ddp  # imports torch._dynamo before the group exists

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
    torch.set_num_threads(1)

    def threads():
        return len(os.listdir("/proc/self/task"))

    class Loop:  # a training loop whose callback a manager would hold: a reference cycle
        def __init__(self):
            self.net = wrap_ddp(nn.Linear(4, 3))
            self.callbacks = [self.on_epoch]

        def on_epoch(self):
            return self.net

    def train():
        loop = Loop()
        loop.net(torch.randn(5, 4)).sum().backward()  # the reducer's allreduce ran on gloo
        return loop

    before = threads()
    init_from_env("gloo", timeout_s=60)
    kept = train()
    if sys.argv[1] == "released":
        del kept
    shutdown_process_group()
    shutdown_process_group()  # a second call is a no-op
    print("THREADS", before, threads())
    """
)


def _run(case: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(find_free_port()),
    }
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, case],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_group_held_by_a_cycle_is_freed_and_its_workers_joined() -> None:
    proc = _run("released")
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("THREADS")]
    assert len(counts) == 1
    before, after = (int(n) for n in counts[0])
    assert after == before  # the gloo workers were joined inside the call
    assert "still referenced" not in proc.stdout


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_group_a_live_ddp_module_still_holds_is_reported() -> None:
    proc = _run("kept")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOG the process group is still referenced" in proc.stdout
    assert "out of scope" in proc.stdout
