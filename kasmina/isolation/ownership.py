"""Who owns each trainable parameter: the registry behind the disjoint-optimizer rule.

Why by memory as well as by identity: ``nn.Parameter(host.weight.data)`` is a new tensor object
that shares the host's storage, so a seed optimizer stepping it would move the host. Two
parameters conflict when their bytes intersect (``kasmina.utils.memory``); disjoint slices of one
flat buffer do not.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Hashable, Iterable
from typing import TypeVar

import torch

from kasmina.errors import ParameterOverlapError
from kasmina.kd import holds
from kasmina.kd.holds import is_teacher_parameter
from kasmina.ops.backend import SUPPORTED_DTYPES
from kasmina.utils.memory import ByteRanges, Span, byte_span, span_signature

K = TypeVar("K", bound=Hashable)
# Per tensor kept: its ``span_signature`` and ``byte_span``, read together.
Read = dict[K, tuple[object, Span | None]]


def collect_tensors(params: Iterable[torch.Tensor], what: str) -> list[torch.Tensor]:
    """Distinct leaf tensors, in order, to register; a clear ``ValueError`` for anything else
    (a non-leaf cannot be optimized, and clipping reads fp32, fp16 and bf16 only). A frozen one
    (``requires_grad=False``: a published mask or index) may be of any dtype: it has no
    gradient, so nothing steps or clips it, yet it is claimed like the rest."""
    if isinstance(params, torch.Tensor):
        params = [params]
    out: list[torch.Tensor] = []
    seen: set[int] = set()
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise ValueError(f"{what} must be tensors, got {type(p).__name__}")
        if isinstance(p, torch.nn.parameter.UninitializedTensorMixin):
            raise ValueError(
                f"{what} include an uninitialised lazy parameter: run one forward through the "
                "model first (a lazy module such as LazyLinear takes its shape from it)"
            )
        if not p.is_leaf:
            raise ValueError(f"{what} must be leaf tensors (a non-leaf cannot be optimized)")
        if p.requires_grad and p.dtype not in SUPPORTED_DTYPES:  # what grad_norms accepts
            raise ValueError(f"{what} must be float32, float16 or bfloat16, got {p.dtype}")
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _reread(read: Read[K], tensors: list[tuple[K, torch.Tensor | None]]) -> Read[K] | None:
    """The spans kept in ``read`` (in the order of ``tensors``; None: a tensor gone) where the
    memory is now: None if no signature moved (one cheap pass), else ``read`` with the span read
    again for each tensor whose signature moved or that is new."""
    now = [None if t is None else span_signature(t) for _, t in tensors]
    if now == [sig for sig, _ in read.values()]:
        return None
    return {
        key: old if (old := read.get(key)) is not None and old[0] == sig
        else (sig, None if t is None else byte_span(t))
        for (key, t), sig in zip(tensors, now, strict=True)
    }  # fmt: skip


def _index(read: Read[K]) -> ByteRanges[K]:
    ranges: ByteRanges[K] = ByteRanges()
    for key, (_, span) in read.items():
        ranges.add_span(key, span)
    return ranges


class _TeacherRanges:
    """The byte ranges of the parameters live, open teachers hold (``kd.holds``), kept between
    checks as the owned ones are: the entries read again when the holds changed
    (``holds.generation``), else each held parameter's signature only, its span again if it moved
    (a teacher cast in place: ``to(dtype)``, a measurement's cast)."""

    def __init__(self) -> None:
        self._generation = -1
        self._entries: list[tuple[weakref.ref[torch.Tensor], weakref.ref[object]]] = []
        self._read: Read[int] = {}
        self._ranges: ByteRanges[int] | None = None

    def current(self) -> ByteRanges[int]:
        if holds.generation() != self._generation:
            self._generation, self._entries = holds.held_entries()
            self._read, self._ranges = {}, None
        # An entry whose teacher or parameter is gone holds nothing: its span leaves the index.
        tensors = [(i, None if h() is None else p()) for i, (p, h) in enumerate(self._entries)]
        read = _reread(self._read, tensors)
        if read is not None:
            self._read, self._ranges = read, None
        if self._ranges is None:
            self._ranges = _index(self._read)
        return self._ranges

    def held(self, params: list[torch.Tensor]) -> tuple[int, str] | None:
        """The first of ``params`` a live teacher holds, by identity or else by memory, and how."""
        held = next((i for i, p in enumerate(params) if is_teacher_parameter(p)), None)
        if held is not None:
            return held, "belongs to a teacher"
        ranges = self.current()
        if not self._entries:  # no teacher holds anything: no new parameter's span is read
            return None
        over = next((i for i, p in enumerate(params) if ranges.overlap(p) is not None), None)
        return None if over is None else (over, "shares memory with a teacher's parameter")


class ParameterOwnership:
    """Maps parameters to one owner name each; refuses any second claim on the same memory.

    A check costs O(new params) plus one cheap pass over the owned ones. The byte ranges of the
    owned tensors are kept (``_read``: each tensor's ``span_signature`` and ``byte_span``, read
    together, and ``_ranges``, their index by storage, labelled by the tensor's id, so that an
    owner is looked up at the check and ``transfer`` changes no range). They are never trusted
    stale: a module converted in place after its parameters were claimed (``host.half()`` swaps
    each parameter's ``.data`` for new storage) is checked where its memory is now, because each
    check first reads every owned tensor's signature, which determines its span, and reads the
    span again only for those whose signature moved. A claim adds its tensors to the index; a
    release drops the index, rebuilt at the next check from the spans kept (no tensor read)."""

    def __init__(self) -> None:
        self._owner: dict[int, tuple[str, torch.Tensor]] = {}  # keeps claimed tensors alive
        # Per owned id, in the order of ``_owner`` (kept so: the signatures compare as one list).
        self._read: Read[int] = {}
        self._ranges: ByteRanges[int] | None = None  # None: rebuild from ``_read``
        self._teachers = _TeacherRanges()  # what a live teacher holds, kept alike

    def owner_of(self, param: torch.Tensor) -> str | None:
        entry = self._owner.get(id(param))
        return entry[0] if entry is not None else None

    def owned_by(self, owner: str) -> list[torch.Tensor]:
        # Copied in one C call first: a reader on another thread (an optimizer manager's
        # ``teacher_param_count``) must not walk the live dict while a claim changes it.
        return [t for name, t in list(self._owner.values()) if name == owner]

    def _current_ranges(self) -> ByteRanges[int]:
        """The owned tensors' byte ranges where their memory is now (see the class docstring)."""
        read = _reread(self._read, [(pid, t) for pid, (_, t) in self._owner.items()])
        if read is not None:  # something moved: re-read it only
            self._read, self._ranges = read, None
        if self._ranges is None:
            self._ranges = _index(self._read)
        return self._ranges

    def check_free(self, params: Iterable[torch.Tensor], new_owner: str) -> None:
        """Raise ``ParameterOverlapError`` if any of ``params`` is already (partly) owned."""
        params = list(params)
        for index, p in enumerate(params):
            owner = self.owner_of(p)
            if owner is not None:
                raise ParameterOverlapError(
                    f"parameter {index} for {new_owner!r} is already owned by {owner!r}"
                )
        ranges = self._current_ranges()
        for index, p in enumerate(params):
            other = ranges.overlap(p)
            if other is not None:
                raise ParameterOverlapError(
                    f"parameter {index} for {new_owner!r} shares memory with a parameter "
                    f"of {self._owner[other][0]!r}"
                )

    def check_optimizable(self, params: list[torch.Tensor], new_owner: str) -> None:
        """``check_free``, after refusing a teacher's parameter (a live, open
        ``CheckpointedTeacher``'s, registered here or not) or one over its bytes (a teacher taken
        in place over them would move with every step): no optimizer ever takes one. Asked
        again after one garbage collection: a teacher dropped unclosed lets go when collected."""
        held = self._teachers.held(params)
        if held is not None:
            gc.collect()
            held = self._teachers.held(params)
        if held is not None:
            raise ParameterOverlapError(
                f"parameter {held[0]} for {new_owner!r} {held[1]} (never optimized)"
            )
        self.check_free(params, new_owner)

    def claim(self, params: Iterable[torch.Tensor], owner: str) -> None:
        """Record ``owner`` for ``params`` (call ``check_free`` first)."""
        for p in params:
            read = (span_signature(p), byte_span(p))
            if id(p) in self._owner:  # claimed again: its old range leaves the index
                self._ranges = None
            self._owner[id(p)] = (owner, p)
            self._read[id(p)] = read
            if self._ranges is not None:
                self._ranges.add_span(id(p), read[1])

    def release(self, owner: str) -> None:
        """Forget everything ``owner`` claimed."""
        self._owner = {pid: e for pid, e in self._owner.items() if e[0] != owner}
        self._read = {pid: r for pid, r in self._read.items() if pid in self._owner}
        self._ranges = None

    def transfer(self, old: str, new: str) -> None:
        """Everything ``old`` owned now belongs to ``new`` (a seed promoted into the host)."""
        self._owner = {
            pid: ((new, t) if name == old else (name, t)) for pid, (name, t) in self._owner.items()
        }
