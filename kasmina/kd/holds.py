"""Which parameters a live KD teacher holds (docs/design.md §7): no optimizer takes one, and no
second teacher takes its model in place (each casts the model in place under its own lock).

One registry for both refusals. A parameter is held while the ``CheckpointedTeacher`` that took
it is alive and open: its ``close()`` (a manager's close, or its next ``load_teacher``) or its
collection lets the parameter go, and the model is the caller's again.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable, Sequence

import torch

from kasmina.utils.locks import fork_safe

# id(param) -> (param, the teacher holding it), both weakly. An entry whose parameter or teacher
# is gone holds nothing (a reused id is told apart by the parameter's identity).
_TEACHER_PARAMS: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[object]]] = {}
# Reentrant: a collection inside a locked block may run a dropped teacher's release.
_LOCK = fork_safe(threading.RLock())
# Bumped, under the lock, by every change of ``_TEACHER_PARAMS`` (a hold, its undo, a release):
# a reader's copy of the entries is current while it is unchanged (``ownership``'s kept ranges).
_GENERATION = 0


def _holder(param: torch.Tensor) -> object | None:
    entry = _TEACHER_PARAMS.get(id(param))
    if entry is None:
        return None
    held, holder = entry[0](), entry[1]()
    return holder if held is param else None


def _held_by_another(param: torch.Tensor, holder: object, replaces: object | None) -> bool:
    found = _holder(param)
    return found is not None and found is not holder and found is not replaces


def is_teacher_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` belongs to a live, open :class:`CheckpointedTeacher` (optimizers refuse
    it; a second in-place teacher of its model is refused)."""
    return _holder(param) is not None


def generation() -> int:
    """How many times the holds changed: ``held_entries`` read at the same count is current."""
    return _GENERATION


def held_entries() -> tuple[int, list[tuple[weakref.ref[torch.Tensor], weakref.ref[object]]]]:
    """The ``generation`` and every entry at it, each (parameter, teacher holding it), weakly:
    one holds nothing once either is gone (a teacher collected unclosed lets go, and so bumps
    the count, when its release runs). An optimizer refuses a held parameter's bytes
    (``nn.Parameter(teacher_param.data)``) as it refuses the parameter."""
    with _LOCK:
        return _GENERATION, list(_TEACHER_PARAMS.values())


def _changed() -> None:
    """Count a change of ``_TEACHER_PARAMS`` (the caller holds ``_LOCK``)."""
    global _GENERATION
    _GENERATION += 1


def hold(
    params: Sequence[torch.Tensor], holder: object, replaces: object | None = None
) -> tuple[weakref.finalize, Callable[[], None]]:
    """Mark ``params`` as ``holder``'s, all or none: ``ValueError`` if another live, open teacher
    than ``replaces`` (the one a manager's next ``load_teacher`` takes over from) holds any of
    them, asked again after one garbage collection (outside the lock: a collection runs
    finalizers), since a teacher dropped without ``close()`` lets go only when collected.
    Returns the release (called once, by ``close()`` or when ``holder`` is collected, it
    unmarks what ``holder`` still holds) and the undo of a hold whose teacher failed to build,
    or held parameters its load or cast replaced: each marked as it was before."""
    ref = weakref.ref(holder)
    for retry in (False, True):
        if retry:
            gc.collect()
        with _LOCK:
            taken = [i for i, p in enumerate(params) if _held_by_another(p, holder, replaces)]
            if not taken:
                before = {id(p): _TEACHER_PARAMS.get(id(p)) for p in params}
                for p in params:
                    _TEACHER_PARAMS[id(p)] = (weakref.ref(p), ref)
                _changed()
                break
    else:
        raise ValueError(
            f"parameter {taken[0]} of this model ({len(taken)} of {len(params)}) is held in "
            "place by another live teacher (load_teacher or CheckpointedTeacher with "
            "copy_model=False), whose forwards a second teacher's casts would break. Pass "
            "copy_model=True (the default: a copy of its own), or close that teacher or its "
            "manager first"
        )
    release = weakref.finalize(holder, _release, list(before), ref)
    release.atexit = False

    def undo() -> None:
        release.detach()
        with _LOCK:
            for key, entry in before.items():
                if _TEACHER_PARAMS.get(key, (None, None))[1] is ref:
                    if entry is None:
                        del _TEACHER_PARAMS[key]
                    else:
                        _TEACHER_PARAMS[key] = entry
            _changed()

    return release, undo


def _release(ids: list[int], ref: weakref.ref[object]) -> None:
    with _LOCK:
        for key in ids:
            entry = _TEACHER_PARAMS.get(key)
            if entry is not None and entry[1] is ref:
                del _TEACHER_PARAMS[key]
        _changed()
