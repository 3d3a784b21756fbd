"""The run-state locks: held by their owner alone, never by a child it forked."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kasmina.control.ledger import NonceLedger
from kasmina.errors import NotARegularFileError
from kasmina.leyline import TelemetryPacket
from kasmina.manager.checkpoints import DiskCheckpointStore
from kasmina.utils.jsonl_sink import JsonlFileSink
from kasmina.utils.locks import fork_safe, lock_exclusive
from kasmina.utils.state_io import CheckpointSigner
from tests.crash import run_bounded_in_child

ROOT = Path(__file__).resolve().parents[2]

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


def _child_writes(store, ledger, sink, report: int) -> None:
    """In a forked child: try each write the parent's run would take; one word per refusal."""
    refused = []
    for name, write in (
        ("checkpoint", lambda: store.save(7, {"epoch": 7})),
        ("prune", lambda: store._delete(0)),
        ("ledger", lambda: ledger.append("child-nonce", 1.0)),
        ("telemetry", lambda: sink.send(TelemetryPacket(packet_id="child"))),
    ):
        try:
            write()
        except (OSError, RuntimeError, ValueError):
            refused.append(name)
    os.write(report, " ".join(refused).encode())


def test_a_forked_child_does_not_write_its_parents_run(tmp_path):
    """A forked child's copy of a manager still has the run's files open, though its locks
    were closed at the fork: its ``end_epoch`` wrote and pruned the parent's checkpoints, and
    its ``close()`` reported into the parent's telemetry file. Every writer refuses there."""
    signer = CheckpointSigner(tmp_path / "ckpt.key", run_id="run")
    store = DiskCheckpointStore(tmp_path / "ckpt", signer, lock_path=tmp_path / "ckpt.lock")
    store.save(0, {"epoch": 0})
    ledger = NonceLedger(tmp_path / "nonces.log", durability="flush")
    ledger.compact([], float("-inf"))
    sink = JsonlFileSink(tmp_path / "telemetry.jsonl")
    sink.send(TelemetryPacket(packet_id="parent"))
    files = {p: p.read_bytes() for p in (tmp_path / "nonces.log", tmp_path / "telemetry.jsonl")}
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            _child_writes(store, ledger, sink, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as report:
        refused = report.read().split()
    os.waitpid(child, 0)
    assert refused == ["checkpoint", "prune", "ledger", "telemetry"]
    assert store.epochs() == [0]
    assert all(path.read_bytes() == data for path, data in files.items())
    # The parent's own writes go on.
    store.save(1, {"epoch": 1})
    ledger.append("parent-nonce", 2.0)
    sink.send(TelemetryPacket(packet_id="parent-2"))
    assert store.epochs() == [0, 1]
    store.close()
    ledger.close()
    sink.close()


def test_a_long_legal_name_gets_a_lock_file_it_can_make(tmp_path) -> None:
    """A JSONL telemetry file or a nonce ledger named with 251-255 bytes: its lock file
    (``<name>.lock``) had a name the filesystem refused; it is cut to fit, one per file."""
    sink = JsonlFileSink(tmp_path / ("t" * 252))
    other = JsonlFileSink(tmp_path / ("t" * 251 + "u"))  # the same head: its own lock
    ledger = NonceLedger(tmp_path / ("n" * 255), durability="flush")
    locks = [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]
    assert len(locks) == 3 and all(len(name) <= 255 for name in locks)
    sink.close()
    other.close()
    ledger.close()


def test_a_filesystem_without_locks_is_no_live_holder(tmp_path, monkeypatch) -> None:
    """NFS without its lock service refuses every ``flock`` (``ENOLCK``): that was taken for
    a lock another live trainer held, and the trainer refused to start pointing at a holder
    that does not exist. The error is the filesystem's, naming the lock file."""
    import errno

    import kasmina.utils.locks as locks

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(locks.fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="nonces.log.lock") as raised:
        NonceLedger(tmp_path / "nonces.log", durability="flush")
    assert raised.value.errno == errno.ENOLCK


def test_fork_safe_locks_a_thread_held_at_the_fork_are_free_in_the_child() -> None:
    """``fork()`` copies only the thread that calls it: a lock another thread held then stayed
    held in the child for good. A ``fork_safe`` lock, reentrant lock or condition is free
    there (a plain lock, for contrast, is not), and its holder in the parent keeps it."""
    plain = threading.Lock()
    locks = [fork_safe(threading.Lock()), fork_safe(threading.RLock())]
    condition = fork_safe(threading.Condition(threading.Lock()))
    held, done = threading.Event(), threading.Event()

    def holder() -> None:
        with plain, locks[0], locks[1], condition:
            held.set()
            done.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(30)

    def child() -> None:
        assert not plain.acquire(timeout=0.1)
        for lock in [*locks, condition]:
            with lock:
                pass
        with condition:
            condition.notify_all()  # no waiter of the parent's left to wake

    try:
        assert run_bounded_in_child(child) == 0
        assert all(not lock.acquire(blocking=False) for lock in [plain, locks[0]])
    finally:
        done.set()
        thread.join(30)


def test_a_fork_inside_a_whole_at_fork_section_does_not_wait_for_itself() -> None:
    """``fork()`` takes the ``whole_at_fork`` lock before it forks; a fork made inside such a
    section (a sink's, say) on the same thread would wait for itself, for good, were that lock
    not reentrant. It forks at once, and the section is free again after, in both processes.
    Run in a fresh interpreter: a fork from a thread of this one (torch and every test's
    threads loaded) is the test suite's own risk, not the lock's."""
    code = textwrap.dedent(
        """
        import os, sys, threading
        from kasmina.utils.locks import whole_at_fork

        codes = []

        def fork_inside():
            with whole_at_fork():
                pid = os.fork()
                if pid == 0:  # the child: the section it inherited is free
                    os._exit(0 if whole_at_fork().acquire(timeout=5) else 1)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

        thread = threading.Thread(target=fork_inside, daemon=True)  # (held for good if it hangs)
        thread.start()
        thread.join(30)
        assert codes == [0], codes
        assert whole_at_fork().acquire(timeout=5)  # given back in the parent too
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
