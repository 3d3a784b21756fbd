"""What a slot's forward can tell of the activation checkpointing around it
(``torch.utils.checkpoint``, Hugging Face's ``gradient_checkpointing_enable``), so that a
recompute takes its first run's path.

A **non-reentrant** checkpoint (``use_reentrant=False``) runs its region under saved-tensor hooks
of its own and recomputes the region in the backward, expecting the very tensors its first run
saved. A distilling slot's path depends on the teacher logits of the call (the KD loss, and the
one-node graft only without one), so each recompute must use the teacher its own first run used:
with the slot called more than once before one backward (a shared block, two forwards and one
loss), a slot-wide memory handed one region's recompute another call's teacher, and the
recompute saved a different number of tensors (``CheckpointError``). ``checkpoint_region`` names
the region (and the recompute) from the hooks on top of the stack, and ``RegionTeachers`` keeps
each region's teachers, call by call, for its recomputes. A seed's kernel that did not run in a
region's first run (it raised once: a transient error) is not called in its recomputes either,
unless it saved tensors in the region before it failed (``RegionRuns``): run there, it made
the recompute save other tensors than the first run.

A **reentrant** checkpoint (``use_reentrant=True``) runs its region's first run under
``no_grad`` and records the graph in its backward: ``graph_to_come`` says so for a call made
there, at the region's entry (an input that needs grad) or deeper in it.

Both read torch's internals (``torch.utils.checkpoint``'s hooks and ``CheckpointFunction``);
changed, they find nothing and the slot falls back to what it did without them, and
``tests/seeds/test_checkpoint_regions.py`` fails on the installed torch.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.utils.checkpoint

from kasmina.seeds.outputs import inputs_need_grad

__all__ = [
    "RegionRuns",
    "RegionTeachers",
    "checkpoint_region",
    "graph_to_come",
    "reentrant_first_run",
]

_T = TypeVar("_T")

_OUTSIDE: tuple[None, None] = (None, None)
_FIRST_RUN = "_checkpoint_hook.__init__.<locals>.pack_hook"  # closes over ``frame``
_RECOMPUTE = "_recomputation_hook.__init__.<locals>.pack_hook"  # over ``target_frame_ref``
_REENTRANT = getattr(torch.utils.checkpoint, "CheckpointFunction", None)
_REENTRANT_CODE = getattr(getattr(_REENTRANT, "forward", None), "__code__", None)
_STACK_BOUND = 256  # frames looked at for a reentrant checkpoint's first run


def checkpoint_region() -> tuple[Any, Any]:
    """The non-reentrant checkpoint region this call runs in: ``(frame, None)`` in its first
    run, ``(frame, rerun)`` in a recompute of it (``frame``: torch's ``_CheckpointFrame``;
    ``rerun``: that recompute's pack hook, one per recompute), else ``(None, None)``: outside
    one, compiled, under other saved-tensor hooks on top (``save_on_cpu`` inside the region), a
    reentrant checkpoint (no hooks), or with torch's internals changed."""
    if torch.compiler.is_compiling():
        return _OUTSIDE
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return _OUTSIDE
    pack = hooks[0]
    inner = getattr(pack, "__wrapped__", pack)  # a recompute's is wrapped (torch._dynamo.disable)
    if getattr(inner, "__module__", None) != "torch.utils.checkpoint":
        return _OUTSIDE
    try:
        cells = dict(zip(inner.__code__.co_freevars, inner.__closure__ or (), strict=True))
        if inner.__qualname__ == _FIRST_RUN and "frame" in cells:
            return cells["frame"].cell_contents, None
        if inner.__qualname__ == _RECOMPUTE and "target_frame_ref" in cells:
            frame = cells["target_frame_ref"].cell_contents()
            return _OUTSIDE if frame is None else (frame, pack)
    except (AttributeError, TypeError, ValueError):  # another torch's closures: none found
        return _OUTSIDE
    return _OUTSIDE


class RegionTeachers:
    """A slot's teacher logits (None: no KD) of each call in each non-reentrant checkpoint
    region's first run, in call order, replayed to the region's recomputes call by call (each
    recompute, a retained graph's second backward too, from the first call). Both maps are weak:
    a region's entry goes with its graph, a recompute's count with the recompute."""

    __slots__ = ("_calls", "_replayed")

    def __init__(self) -> None:
        self._calls: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
        self._replayed: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    @classmethod
    def kept(cls, regions: RegionTeachers | None, frame: Any, teacher: Any) -> RegionTeachers:
        """``regions`` (a new one for None) with ``teacher`` kept as the next call of ``frame``."""
        regions = cls() if regions is None else regions
        regions._calls.setdefault(frame, []).append(teacher)
        return regions

    @staticmethod
    def replayed(regions: RegionTeachers | None, frame: Any, rerun: Any, given: Any) -> Any:
        """The teacher of the call of ``frame``'s first run that ``rerun`` repeats now; ``given``
        (the call's own ``teacher_logits=``, or None) where that run kept none: it ran with
        nothing pending, so with only what the call itself was given."""
        if regions is None:
            return given
        calls = regions._calls.get(frame, ())
        index = regions._replayed.get(rerun, 0)
        regions._replayed[rerun] = index + 1
        return calls[index] if index < len(calls) else given


class RegionRuns:
    """For each call of a seed's kernel in each non-reentrant checkpoint region's first run, in
    call order, whether its recompute calls the kernel again: a call that gave no output (a
    fault, a refused input) and saved nothing in the region is not made again. Made, a kernel
    that had raised once (a transient error: an allocation) ran in the recompute where its first
    run took the host's path (other saved tensors: a ``CheckpointError`` out of the host's
    backward, or the wrong tensors unpacked where the shapes agree). One that saved tensors in
    the region before it failed (an ACTIVE kernel's graph is the host's) is called again: a
    deterministic fault saves them again (a transient one there is not covered). A kernel
    before ACTIVE saves none in the region (``side_effects.island_saves``). Weak maps, as
    ``RegionTeachers``'s; the region's saves are counted on torch's frame (``weak_holders``),
    and without it every call is made again, as before."""

    __slots__ = ("_calls", "_replayed")

    def __init__(self) -> None:
        self._calls: weakref.WeakKeyDictionary[Any, list[bool]] = weakref.WeakKeyDictionary()
        self._replayed: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()

    @classmethod
    def run(
        cls, runs: RegionRuns | None, region: tuple[Any, Any], call: Callable[[], _T | None]
    ) -> tuple[_T | None, RegionRuns]:
        """``call()`` and ``runs`` (a new one for None) inside ``region``, a checkpoint region
        (``checkpoint_region()``, the caller's: outside one it calls the kernel without this
        bookkeeping): in its first run, whether a recompute makes the call again is kept as the
        region's next call; in a recompute, a call not to be made again gives None."""
        frame, rerun = region
        runs = cls() if runs is None else runs
        if rerun is None:
            saves = getattr(frame, "weak_holders", None)  # the region's saved tensors so far
            before = len(saves) if isinstance(saves, list) else None
            result = call()
            again = result is not None or before is None or len(saves) != before
            runs._calls.setdefault(frame, []).append(again)
            return result, runs
        calls = runs._calls.get(frame, ())
        index = runs._replayed.get(rerun, 0)
        runs._replayed[rerun] = index + 1
        return (call() if index >= len(calls) or calls[index] else None), runs


def reentrant_first_run() -> bool:
    """Whether this call runs in the first run of a reentrant checkpoint that records a graph:
    ``CheckpointFunction``'s forward on the Python stack (at most ``_STACK_BOUND`` frames up)
    with its node connected to the graph (grad on at the checkpoint's call, an input needing
    grad: the node has edges), so that its backward will recompute the region; a checkpoint
    called under an outer ``no_grad`` (a validation forward) records none. Eager only; a walk of
    the stack, walked only inside an autograd Function's forward and asked only under
    ``no_grad`` (``graph_to_come``)."""
    if _REENTRANT_CODE is None or torch.compiler.is_compiling():
        return False
    # An autograd Function's forward runs with forward-mode AD off too: elsewhere (a validation
    # under ``no_grad``) it is on, or inference mode is, and no stack is walked.
    if torch._C._is_fwd_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    return _reentrant_edges() is True


def _reentrant_edges() -> bool | None:
    """Whether a ``CheckpointFunction`` forward on the stack (at most ``_STACK_BOUND`` frames
    up) has graph edges (an outer one's recompute runs an inner one's too: any of them); None
    where none is on the stack."""
    seen = None
    frame = sys._getframe(2)
    for _ in range(_STACK_BOUND):
        if frame is None:
            break
        if frame.f_code is _REENTRANT_CODE:
            if getattr(frame.f_locals.get("ctx"), "next_functions", ()):
                return True
            seen = False
        frame = frame.f_back
    return seen


def graph_to_come(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call that records no graph now will record one in a backward: under
    ``no_grad``, a reentrant checkpoint's first run, whose recompute runs the seeds' kernels
    with a graph. At the region's entry an input needs grad (``inputs_need_grad``) and the call
    runs in an autograd Function's forward, where forward-mode AD is off (an input the model
    marked itself under ``no_grad``, as Wav2Vec2's feature encoder does in training, is no
    region's); there torch's own checkpoint answers from its node's edges, as deeper in (one
    called under an outer ``no_grad`` records none: Wav2Vec2 with gradient checkpointing in a
    validation forward), and another library's Function (no torch checkpoint on the stack) is
    taken for a region. Deeper in the input is a host activation made under ``no_grad``, and
    the stack tells."""
    grad = torch.is_grad_enabled()
    if inputs_need_grad(args, kwargs):
        if grad or torch.compiler.is_compiling():
            return True
        if torch._C._is_fwd_grad_enabled():  # not in an autograd Function's forward
            return False
        return _REENTRANT_CODE is None or _reentrant_edges() is not False
    return not grad and reentrant_first_run()
