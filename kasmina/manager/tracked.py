"""The user's tracked objects (``manager.track``: an LR scheduler, a ``GradScaler``, an EMA
model) in the epoch checkpoints, and back out of them for a rollback.

Each object is tracked under a name with a generation, counted per name by the manager that
tracks it (``ManagerState.track``): tracking a name again (an EMA copy made again after a CULL)
starts a new generation, and a checkpoint this manager took of the old object's state must not
go into the new one (its shapes may differ; its load raising would refuse every rollback to
that checkpoint). Each saved state is marked with its writer, the manager that saved it. Another
process cannot know which of its generations was which here: a resumed run's manager tracks its
objects afresh, in its own order and number. So a state another writer saved goes into the
first object tracked under its name instead: a resumed run gets its scheduler and scaler back
however it orders its ``track`` calls (docs/design.md §6a). The ranks of one run track alike,
so a rank repaired from another's snapshot counts that rank's generations as its own
(``ManagerState.peer_writers``): the snapshot, and the source's checkpoint it keeps, load
into the objects the source's own rollback would load them into.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Mapping
from typing import Any

from kasmina.utils.state_io import unsaveable

logger = logging.getLogger(__name__)

__all__ = ["put_back_tracked", "saved_tracked", "tracked_states", "writers_of"]


def tracked_states(tracked: Mapping[str, tuple[Any, int]], writer: str) -> dict[str, Any]:
    """Each tracked object's state and generation for a snapshot, marked as ``writer``'s; one
    whose state no longer is what ``weights_only`` loads is left out (logged)."""
    states = {}
    for name, (obj, generation) in tracked.items():
        state = obj.state_dict()
        problem = unsaveable(state)
        if problem is None:
            states[name] = {"generation": generation, "writer": writer, "state": state}
        else:
            logger.error("tracked %r left out of the checkpoint: its state holds %s", name, problem)
    return states


def put_back_tracked(tracked: Mapping[str, tuple[Any, Any]], states: Mapping[str, Any]) -> None:
    """The tracked objects' states from before a rollback that failed; one whose own load fails
    again is logged and the others are still put back (the failure being undone propagates)."""
    for name, before in states.items():
        try:
            tracked[name][0].load_state_dict(before)
        except Exception:
            logger.exception("rollback undo: tracked %r could not be put back", name)


def saved_tracked(
    extra: Any, live: Mapping[str, tuple[Any, int]], epoch: int, own: Container[str]
) -> dict[str, tuple[Any, Any]]:
    """The live tracked objects with their states in a checkpoint (``snapshot``'s
    ``extra["tracked"]``): a state written by one of the ``own`` writers goes into the object
    of its generation, another writer's into the first object tracked under its name. One
    tracked since (none of that name there, or tracked again: an EMA copy made again after a
    CULL) is left as it is (logged)."""
    saved = extra.get("tracked", {}) if isinstance(extra, Mapping) else {}
    if not isinstance(saved, Mapping):
        raise ValueError(f"checkpoint of epoch {epoch}: tracked states are malformed")
    found = {}
    for name, (obj, generation) in live.items():
        entry = saved.get(name)
        if not isinstance(entry, Mapping):
            continue
        writer = entry.get("writer")
        ours = isinstance(writer, str) and writer in own
        if generation == (entry.get("generation") if ours else 1):
            found[name] = (obj, entry.get("state"))
    absent = sorted(set(live) - set(saved))
    again = sorted(set(live) - set(found) - set(absent))
    if absent:
        logger.warning("checkpoint of epoch %d holds no state of %s: left alone", epoch, absent)
    if again:
        logger.warning("checkpoint of epoch %d holds the state of objects tracked under %s "
                       "before the live ones: left alone", epoch, again)  # fmt: skip
    return found


def writers_of(checkpoint: Any) -> frozenset[str]:
    """The writers of a checkpoint's (or snapshot's) tracked states."""
    extra = checkpoint.get("extra") if isinstance(checkpoint, Mapping) else None
    saved = extra.get("tracked") if isinstance(extra, Mapping) else None
    entries = saved.values() if isinstance(saved, Mapping) else ()
    marks = (e.get("writer") for e in entries if isinstance(e, Mapping))
    return frozenset(m for m in marks if isinstance(m, str))
