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
    import logging, os, sys, time
    import torch
    from torch import nn
    from kasmina.control.processes import init_from_env, shutdown_process_group
    from kasmina.manager.ddp import wrap_ddp  # imports torch._dynamo before the group exists

    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(message)s")
    torch.set_num_threads(1)

    def threads():
        return len(os.listdir("/proc/self/task"))

    def names():
        found = []
        for task in os.listdir("/proc/self/task"):
            try:
                found.append(open(f"/proc/self/task/{task}/comm").read().strip())
            except OSError:  # it exited meanwhile
                pass
        return found

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
    workers = [n for n in names() if "gloo" in n or "tcpstore" in n]  # right after the call
    deadline = time.monotonic() + 10  # init's own short-lived helpers may still be exiting
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    print("THREADS", before, threads(), ",".join(workers) or "-")
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
    before, after, workers = counts[0]
    assert workers == "-"  # the gloo and store threads were joined inside the call
    # Nothing else outlives it: the count comes back (init_process_group's unnamed helper
    # threads exit on their own, at times a moment after the call: read at once, a run failed).
    assert int(after) == int(before)
    assert "still referenced" not in proc.stdout


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_a_group_a_live_ddp_module_still_holds_is_reported() -> None:
    proc = _run("kept")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOG the process group is still referenced" in proc.stdout
    assert "out of scope" in proc.stdout


def _rank_that_trains_on(rank: int, world: int, directory: str) -> None:
    """A rank that would run for minutes: says it started, then sleeps."""
    import time

    Path(directory, f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(300)


@pytest.mark.usefixtures("sigint_raises")  # a suite started in the background ignores SIGINT
def test_an_interrupted_spawn_leaves_no_rank_running(tmp_path: Path) -> None:
    """A Ctrl-C sent to the parent alone (``kasmina demo --nproc 2``) stopped the parent's wait,
    but the ranks trained on to the end and wrote their result after the interrupt."""
    import signal
    import threading
    import time

    from kasmina.control.processes import spawn

    def interrupt_once_started() -> None:
        deadline = time.monotonic() + 240
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        spawn(_rank_that_trains_on, 2, args=(str(tmp_path),), backend="gloo", join_timeout_s=280)
    pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):  # killed and reaped before spawn returned
            os.kill(pid, 0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nprocs": 0}, "nprocs"),
        ({"nprocs": 2.5}, "nprocs"),
        ({"nprocs": True}, "nprocs"),
        ({"nprocs": 2, "join_timeout_s": float("nan")}, "join_timeout_s"),
        ({"nprocs": 2, "join_timeout_s": float("inf")}, "join_timeout_s"),
        ({"nprocs": 2, "join_timeout_s": 0}, "join_timeout_s"),
        ({"nprocs": 2, "timeout_s": 0}, "timeout_s"),
        ({"nprocs": 2, "timeout_s": -1.0}, "timeout_s"),
        ({"nprocs": 2, "timeout_s": float("nan")}, "timeout_s"),
        ({"nprocs": 2, "timeout_s": 1e-4}, "timeout_s must be from"),
        ({"nprocs": 2, "timeout_s": 1e10}, "timeout_s must be from"),
        ({"nprocs": 2, "timeout_s": 1e300}, "timeout_s must be from"),
    ],
)
def test_spawn_refuses_a_bad_count_or_join_timeout_before_it_starts_a_rank(kwargs, match) -> None:
    """A NaN join timeout compared False against every time: the run was bounded by nothing.
    A collective timeout of 0 or less (or NaN) started every rank, each of which then failed
    its rendezvous ("timed out after 0ms") or its conversion, and so did one so long that the
    store's deadline overflowed (1e10 s) or its conversion did (1e300), or under the store's
    millisecond (1e-4 s: "timed out after 0ms")."""
    from kasmina.control.processes import spawn

    with pytest.raises(ValueError, match=match):
        spawn(print, **kwargs)


def test_init_from_env_refuses_a_collective_timeout_no_store_can_wait() -> None:
    """Refused before the environment is read: no process group is started."""
    from kasmina.control.processes import init_from_env

    for bad in (0, float("nan"), 1e-4, 1e10):
        with pytest.raises(ValueError, match="timeout_s"):
            init_from_env("gloo", timeout_s=bad)
