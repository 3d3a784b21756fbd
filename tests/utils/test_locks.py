"""The run-state locks: held by their owner alone, never by a child it forked."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from kasmina.errors import NotARegularFileError
from kasmina.utils.locks import lock_exclusive

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() children only")


def _worker(path: str, report: int) -> None:
    """A forked worker (a Pool or DataLoader worker under the fork start method): it reports
    whether its parent still holds the lock, then outlives it."""
    os.write(report, f"worker {os.getpid()} {int(lock_exclusive(path) is None)}\n".encode())
    time.sleep(60)


def _trainer(path: str, report: int) -> None:
    """Takes the lock, forks a worker as multiprocessing's fork start method does, and waits
    to be killed."""
    held = lock_exclusive(path)
    worker = multiprocessing.get_context("fork").Process(target=_worker, args=(path, report))
    worker.start()
    os.write(report, f"trainer {os.getpid()} {int(held is not None)}\n".encode())
    time.sleep(60)


def test_a_trainer_killed_while_its_forked_worker_lives_leaves_no_lock(tmp_path):
    """A forked child shares its parent's open files, and a ``flock`` lasts until the last of
    them closes: a worker outliving a SIGKILLed trainer would keep the run's lock and refuse
    the restart. The child closes its copies at fork, so the restart takes the lock while the
    orphan lives, and the parent held its lock all along (the worker saw it held)."""
    path = str(tmp_path / "run.lock")
    read_end, write_end = os.pipe()
    trainer = os.fork()
    if trainer == 0:  # pragma: no cover - the trainer
        try:
            _trainer(path, write_end)
        finally:
            os._exit(1)
    os.close(write_end)
    with os.fdopen(read_end) as report:  # one line each (EOF only once both are gone)
        lines = [report.readline().split() for _ in range(2)]
    seen = {role: (int(pid), flag == "1") for role, pid, flag in lines}
    worker_pid = seen["worker"][0]
    try:
        assert seen["trainer"][1]  # the trainer took the lock
        assert seen["worker"][1]  # the worker closing its copy did not unlock its parent
        assert lock_exclusive(path) is None  # the live trainer holds it
        os.kill(trainer, signal.SIGKILL)
        os.waitpid(trainer, 0)
        os.kill(worker_pid, 0)  # the orphan lives on
        restarted = lock_exclusive(path)
        assert restarted is not None  # and holds no lock: the restart is not refused
        restarted.close()
    finally:
        os.kill(worker_pid, signal.SIGKILL)


def test_a_fifo_or_symlink_at_a_lock_path_is_refused_at_once(tmp_path):
    """A FIFO planted where a run's lock file goes (a shared checkpoint directory) made the
    open block for good, and the trainer hung at start; a symlink there was opened through,
    creating an empty file at its target. Both are refused now, without waiting."""
    fifo = tmp_path / "nonces.log.lock"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(NotARegularFileError, match="FIFO"):
        lock_exclusive(fifo)
    assert time.monotonic() - started < 5
    target, link = tmp_path / "elsewhere", tmp_path / "run.lock"
    link.symlink_to(target)
    with pytest.raises(OSError):
        lock_exclusive(link)
    assert not target.exists()
    held = lock_exclusive(tmp_path / "plain.lock")
    assert held is not None and lock_exclusive(tmp_path / "plain.lock") is None
    held.close()
