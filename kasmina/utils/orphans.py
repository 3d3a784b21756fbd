"""Sinks of an owner collected without closing them (a manager dropped unclosed).

A manager adds its JSONL sink to a reporter that may outlive it: the caller's, or the one its
model's state table keeps after the manager is gone. A sink left there would hold its file,
and the file's lock, for good, so ``add_owned_sink`` puts a finalizer on the owner. The
finalizer runs wherever a collection lands, perhaps inside a lock that taking the sink off
takes too (the reporter's, or the sink's own, on the same thread), so it only queues the sink;
the reporter's next packet or sink, or a new sink waiting for the file's lock, closes it
(``release_orphaned_sinks``). No import of the reporter here: it calls this module.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ORPHANED_SINKS", "add_owned_sink", "release_orphaned_sinks"]

# Sinks whose owner was collected without closing them (``add_owned_sink``): a finalizer runs
# wherever a collection lands, perhaps inside a lock that closing the sink takes (a reporter's
# or the sink's own), so it only queues them here; ``release_orphaned_sinks`` closes them.
ORPHANED_SINKS: deque[tuple[weakref.ref[Any], Any]] = deque()


def add_owned_sink(reporter: Any, sink: Any, owner: object) -> Callable[[], None]:
    """Add ``owner``'s own ``sink`` (if any) to ``reporter``, and return what takes it off
    again and closes it. The reporter may outlive its owner (the caller's, or the one a model's
    state table keeps), and a sink it kept would hold its file, and the file's lock, for good:
    once ``owner`` is collected unclosed, the reporter's next packet or sink, or a new sink's
    wait for the file's lock (``JsonlFileSink``), takes it off and closes it. Held weakly here,
    the reporter is not kept alive by the finalizer, nor anything a sink of it holds."""
    if sink is None:
        return lambda: None
    reporter.add_sink(sink)
    ref = weakref.ref(reporter)
    collected = weakref.finalize(owner, ORPHANED_SINKS.append, (ref, sink))

    def release() -> None:
        if collected.detach() is not None:  # not queued yet: closed now
            _take_off(ref, sink)

    return release


def release_orphaned_sinks() -> None:
    """Take off and close the sinks whose owners were collected unclosed (no lock held here)."""
    while ORPHANED_SINKS:
        try:
            ref, sink = ORPHANED_SINKS.popleft()
        except IndexError:  # another thread took the last one
            return
        try:
            _take_off(ref, sink)
        except Exception:
            logger.exception("closing telemetry sink %r of a collected owner raised", sink)


def _take_off(reporter: weakref.ref[Any], sink: Any) -> None:
    live = reporter()
    if live is not None:
        live.close_sink(sink)
        return
    close = getattr(sink, "close", None)
    if callable(close):
        close()
