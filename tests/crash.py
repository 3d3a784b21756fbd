"""Real crashes for the crash-consistency tests: the code under test runs in a forked child,
which dies by ``os._exit`` exactly where a test makes it (no ``finally``, no cleanup, no flush),
and the parent then inspects what the disk holds, as a restarted process would."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NoReturn

# The exit status of a child killed where the test made it (as SIGKILL's shell status).
KILLED = 137
# A child whose code under test raised instead of dying or finishing.
RAISED = 3


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
