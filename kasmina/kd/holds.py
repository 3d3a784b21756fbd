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
from collections.abc import Sequence

import torch

# id(param) -> (param, the teacher holding it), both weakly. An entry whose parameter or teacher
# is gone holds nothing (a reused id is told apart by the parameter's identity).
_TEACHER_PARAMS: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[object]]] = {}
# Reentrant: a collection inside a locked block may run a dropped teacher's release.
_LOCK = threading.RLock()


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


def _marked(
    params: Sequence[torch.Tensor], holder: object | None, replaces: object | None
) -> weakref.ref[object] | None:
    """Mark ``params`` as ``holder``'s (None: only ask) unless another live, open teacher than
    ``holder`` and ``replaces`` holds one; asked again after one garbage collection (outside
    the lock: a collection runs finalizers), since a teacher dropped without ``close()`` lets
    go only when collected. ``ValueError`` if one is still held; else the mark's reference to
    ``holder``."""
    ref = None if holder is None else weakref.ref(holder)
    for retry in (False, True):
        if retry:
            gc.collect()
        with _LOCK:
            taken = [i for i, p in enumerate(params) if _held_by_another(p, holder, replaces)]
            if not taken:
                if ref is not None:
                    for p in params:
                        _TEACHER_PARAMS[id(p)] = (weakref.ref(p), ref)
                return ref
    raise ValueError(
        f"parameter {taken[0]} of this model ({len(taken)} of {len(params)}) is held in place "
        "by another live teacher (load_teacher or CheckpointedTeacher with copy_model=False), "
        "whose forwards a second teacher's casts would break. Pass copy_model=True (the "
        "default: a copy of its own), or close that teacher or its manager first"
    )


def check_free(params: Sequence[torch.Tensor], replaces: object | None = None) -> None:
    """``ValueError`` if another live, open teacher than ``replaces`` (the one a manager's next
    ``load_teacher`` takes over from) holds any of ``params``: asked before a teacher changes
    its model (a load, a cast), which :func:`hold` marks afterwards."""
    _marked(params, None, replaces)


def hold(
    params: Sequence[torch.Tensor], holder: object, replaces: object | None = None
) -> weakref.finalize:
    """Mark ``params`` as ``holder``'s, all or none (``ValueError`` as :func:`check_free`).
    Returns the release: called once, by ``close()`` or when ``holder`` is collected, it
    unmarks what ``holder`` still holds."""
    ref = _marked(params, holder, replaces)
    release = weakref.finalize(holder, _release, [id(p) for p in params], ref)
    release.atexit = False
    return release


def _release(ids: list[int], ref: weakref.ref[object]) -> None:
    with _LOCK:
        for key in ids:
            entry = _TEACHER_PARAMS.get(key)
            if entry is not None and entry[1] is ref:
                del _TEACHER_PARAMS[key]
