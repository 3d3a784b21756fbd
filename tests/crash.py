"""Real crashes for the crash-consistency tests: the code under test runs in a forked child,
which dies by ``os._exit`` exactly where a test makes it (no ``finally``, no cleanup, no flush),
and the parent then inspects what the disk holds, as a restarted process would."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

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
