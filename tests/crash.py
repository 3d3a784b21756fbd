"""Real crashes for the crash-consistency tests: the code under test runs in a forked child,
which dies by ``os._exit`` exactly where a test makes it (no ``finally``, no cleanup, no flush),
and the parent then inspects what the disk holds, as a restarted process would."""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

# The exit status of a child killed where the test made it (as SIGKILL's shell status).
KILLED = 137
# A child whose code under test raised instead of dying or finishing.
RAISED = 3
# A child still blocked when its time ran out (``run_bounded_in_child``): killed by SIGALRM.
HUNG = -signal.SIGALRM


def die() -> NoReturn:
    """The process ends here, as under SIGKILL."""
    os._exit(KILLED)


def run_in_child(action: Callable[[], object]) -> int:
    """Run ``action`` in a forked child: its exit code (0: finished, ``KILLED``: died where
    the test made it, ``RAISED``: raised)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            action()
        except BaseException:
            code = RAISED
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def said_in_child(action: Callable[[], str]) -> str:
    """Run ``action`` in a forked child and return what it said (its result, at most 4 KiB), or
    ``raised <type>: <message>``. The child ends by ``os._exit``: no cleanup of the parent's runs
    there, and no torch op should run in ``action`` (OpenMP after a fork)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            said = action()
        except BaseException as exc:
            said = f"raised {type(exc).__name__}: {exc}"
        try:
            os.write(write_end, said.encode()[:4096])
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as report:
        said = report.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return said


def run_bounded_in_child(action: Callable[[], object], timeout_s: int = 60) -> int:
    """Run ``action`` in a forked child that may block for good (a lock held at the fork): its
    exit code (0: finished, ``RAISED``: raised, its traceback on stderr, ``HUNG``: still running
    after ``timeout_s``, ended by an alarm of its own). Never left behind: past that and a grace
    period, the parent kills it."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(timeout_s)
            action()
        except BaseException:
            traceback.print_exc()
            code = RAISED
        os._exit(code)
    deadline = time.monotonic() + timeout_s + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.01)


class TornWriter:
    """A file whose first write stops part way (``keep`` bytes, default half), and the process
    with it: what a kill in the middle of a write leaves on disk."""

    def __init__(self, handle: Any, keep: int | None = None) -> None:
        self.handle = handle
        self.keep = keep

    def __enter__(self) -> TornWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, data: bytes) -> None:
        self.handle.write(data[: len(data) // 2 if self.keep is None else self.keep])
        self.handle.flush()
        die()
