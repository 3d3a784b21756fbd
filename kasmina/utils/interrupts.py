"""Holding a Ctrl-C across the commit of an all-or-nothing change.

Kasmina's state changes validate and load everything first, then commit: move prepared objects
into place, copy validated tensors. Nothing in a commit is expected to fail, but a SIGINT can
arrive anywhere, and Python turns it into a ``KeyboardInterrupt`` between any two bytecodes: a
commit cut there leaves half the change applied. ``interrupts_deferred`` holds the signal until
the block ends and then delivers it as the previous handler would have (by default, a
``KeyboardInterrupt`` raised where the block ends), so the user's Ctrl-C still stops the
program, after the commit.

Signals reach only the main thread, and only its handler can be replaced, so elsewhere the
block runs as it is (a commit on another thread cannot be interrupted by SIGINT anyway); so does
it where the handler was installed outside Python (an embedding application's), which could not
be put back afterwards.

The handlers are read and swapped through ``_signal``, the C module that ``signal`` wraps:
the wrapper converts every handler it returns into its ``Handlers`` enum, and for a function
(Python's default handler is one) that conversion raises and catches a ``ValueError``, about
10 us per call on a small virtual machine. The three calls of a hold cost 27 us through
``signal`` and under 2 us through ``_signal``, with the same effect (the enum's members are
the integers ``_signal`` returns).
"""

from __future__ import annotations

import _signal
import signal
import threading
from types import FrameType
from typing import Protocol

__all__ = ["interrupts_deferred", "take_lock"]

_SIGINT = int(signal.SIGINT)


class interrupts_deferred:  # noqa: N801 - used as ``with interrupts_deferred():``
    """Run the block with SIGINT held; a SIGINT that arrived is delivered when it ends.

    A class rather than a generator-based context manager: the arrival path of every command
    runs one on the main thread, and a generator's set-up cost about 2 us more there."""

    __slots__ = ("_held", "_previous")

    def __init__(self) -> None:
        self._held: list[tuple[int, FrameType | None]] = []
        self._previous: object = None  # None: nothing to put back

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = _signal.getsignal(_SIGINT)
        if previous is None:  # installed outside Python: it could not be put back, so leave it
            return
        try:
            _signal.signal(_SIGINT, self._hold)
        except ValueError:  # not the main interpreter: signals are not ours to handle
            return
        self._previous = previous

    def __exit__(self, *exc: object) -> None:
        previous, self._previous = self._previous, None
        if previous is None:
            return
        _signal.signal(_SIGINT, previous)
        held, self._held = self._held, []
        if held:
            _deliver(previous, *held[0])

    def _hold(self, signum: int, frame: FrameType | None) -> None:
        self._held.append((signum, frame))

    def deliver_held(self) -> None:
        """Deliver a SIGINT held so far at once, as the previous handler would (by default: a
        ``KeyboardInterrupt`` raised here; ignored, or a handler that only records it: nothing
        raised, and the block goes on holding the next one)."""
        held, self._held = self._held, []
        if held and self._previous is not None:
            _deliver(self._previous, *held[0])


def _deliver(handler: object, signum: int, frame: FrameType | None) -> None:
    """What ``handler`` would have done with the signal (SIG_DFL: the default action)."""
    if callable(handler):
        handler(signum, frame)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)
    # SIG_IGN: nothing to do


class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...


def take_lock(lock: _Lock, hold: interrupts_deferred) -> None:
    """Take ``lock`` inside ``hold``'s block, a SIGINT that arrives meanwhile delivered as its
    handler would (polled every 50 ms): a ``KeyboardInterrupt`` propagates without the lock,
    an ignored or recorded one does not stop the wait. (A plain ``acquire()`` would raise it
    anywhere, even just after taking the lock, which the caller would then never release.)"""
    while not lock.acquire(timeout=0.05):
        hold.deliver_held()
