"""Which parameters a live KD teacher holds (docs/design.md §7): no optimizer takes one, and no
second teacher takes its model, or a model over its bytes, in place (each casts the model in
place under its own lock, and its checkpoint load writes it).

One registry for both refusals. A parameter is held while the ``CheckpointedTeacher`` that took
it is alive and open: its ``close()`` (a manager's close, or its next ``load_teacher``) or its
collection lets the parameter go, and the model is the caller's again.

What else a model taken in place must not be is a package above's to say (no live manager's
model: ``manager.exclusive``), which this one never imports: it adds its check here
(``add_in_place_check``), and every teacher built in place runs it (``check_in_place``), through
a manager's ``load_teacher`` or not.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from kasmina.utils.locks import fork_safe
from kasmina.utils.memory import ByteRanges

# id(param) -> (param, the teacher holding it), both weakly. An entry whose parameter or teacher
# is gone holds nothing (a reused id is told apart by the parameter's identity).
_TEACHER_PARAMS: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[object]]] = {}
# Reentrant: a collection inside a locked block may run a dropped teacher's release.
_LOCK = fork_safe(threading.RLock())
# Bumped, under the lock, by every change of ``_TEACHER_PARAMS`` (a hold, its undo, a release):
# a reader's copy of the entries is current while it is unchanged (``ownership``'s kept ranges).
_GENERATION = 0
# Each check of a model a teacher is to take in place (``ValueError`` if it may not), by name: a
# module reloaded replaces its own. Added at import by the package that holds what it guards.
_IN_PLACE_CHECKS: dict[str, Callable[[nn.Module], None]] = {}


def add_in_place_check(check: Callable[[nn.Module], None]) -> None:
    """Run ``check(model)`` on every model a teacher takes in place, before anything is held or
    changed; it raises ``ValueError`` for one it may not take."""
    _IN_PLACE_CHECKS[f"{check.__module__}.{check.__qualname__}"] = check


def check_in_place(model: nn.Module) -> None:
    """The added checks of a model a teacher is to take in place (``add_in_place_check``)."""
    for check in list(_IN_PLACE_CHECKS.values()):
        check(model)


def _holder(param: torch.Tensor) -> object | None:
    entry = _TEACHER_PARAMS.get(id(param))
    if entry is None:
        return None
    held, holder = entry[0](), entry[1]()
    return holder if held is param else None


def _taken(
    params: Sequence[torch.Tensor], holder: object, replaces: object | None
) -> list[tuple[int, str]]:
    """Each of ``params`` another live, open teacher than ``holder`` and ``replaces`` holds, by
    identity or else by memory (``nn.Parameter(w.data)``, a parameter shared with another model:
    a new object over its bytes, which the other's load and cast would write), with that
    teacher's name (never the teacher: a dropped one must stay collectable for ``hold``'s retry,
    and an error's traceback must not keep one alive). Called under ``_LOCK``."""

    def another(found: object | None) -> bool:
        return found is not None and found is not holder and found is not replaces

    held: ByteRanges[object] = ByteRanges()
    for param_ref, holder_ref in _TEACHER_PARAMS.values():
        param, found = param_ref(), holder_ref()
        if param is not None and another(found):
            held.add(found, param)
    taken: list[tuple[int, str]] = []
    for i, p in enumerate(params):
        found = _holder(p)
        found = found if another(found) else held.overlap(p)
        if found is not None:
            taken.append((i, repr(found)))
    return taken


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
            taken = _taken(params, holder, replaces)
            if not taken:
                before = {id(p): _TEACHER_PARAMS.get(id(p)) for p in params}
                for p in params:
                    _TEACHER_PARAMS[id(p)] = (weakref.ref(p), ref)
                _changed()
                break
    else:
        first, other = taken[0]
        raise ValueError(
            f"parameter {first} of this model ({len(taken)} of {len(params)}), or memory under "
            f"it, is held in place by another live teacher, {other} (load_teacher or "
            "CheckpointedTeacher with copy_model=False), whose forwards a second teacher's "
            "checkpoint load and casts would break. Pass "
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
