"""Where a tensor's bytes are: the one test of shared memory.

Identity is not enough: ``nn.Parameter(w.data)`` and ``b.weight.data = a.weight.data`` make new
tensor objects over an existing storage. Two tensors share memory when their byte ranges in one
storage intersect; disjoint slices of one flat buffer do not, and an empty tensor holds no byte.
Used for one owner per parameter (``isolation.ownership``), one manager per model
(``manager.exclusive``) and an artifact's tensors that a seed's copy would split
(``urza.aliasing``). The ranges are read from the tensors when they are added. One kept across
calls is stale once its tensor moves: a module converted in place (``host.half()`` swaps each
parameter's ``.data``) must be compared where its memory is now. ``span_signature`` is the cheap
test of that (six getters, about a third of ``byte_span``'s cost): equal signatures, equal spans.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Generic, TypeVar

import torch

__all__ = ["ByteRanges", "Span", "byte_span", "span_signature"]

L = TypeVar("L")
StorageKey = tuple[str, int]
Span = tuple[StorageKey, int, int]


def byte_span(t: torch.Tensor) -> Span | None:
    """``(storage key, start, end)``: the bytes ``[start, end)`` that ``t`` spans in its storage;
    None for a tensor whose memory cannot be compared (meta: every one at address 0; sparse or
    another layout without a storage of its own; a lazy parameter, which holds none yet)."""
    if isinstance(t, torch.nn.parameter.UninitializedTensorMixin) or t.is_meta:
        return None
    try:
        key = (str(t.device), t.untyped_storage().data_ptr())
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # no storage of its own
        return None
    if t.numel() == 0:
        return key, start, start
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) + 1
    return key, start, start + span * t.element_size()


def span_signature(t: torch.Tensor) -> tuple[object, ...] | None:
    """Everything ``byte_span`` reads, read cheaply: while a tensor's signature is unchanged, so
    is its span. The storage's address is the data pointer less the offset (in elements of the
    dtype); the extent follows from shape, stride and dtype; the device names the address space.
    None for a tensor without a data pointer (sparse; a lazy parameter, which refuses with
    ``ValueError``), whose span is None too."""
    try:
        return (t.data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype, t.device)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # no storage of its own
        return None


class ByteRanges(Generic[L]):
    """The byte ranges of labelled tensors, by storage: which of them a tensor's bytes intersect."""

    def __init__(self, labelled: Iterable[tuple[L, torch.Tensor]] = ()) -> None:
        self._ranges: dict[StorageKey, list[tuple[int, int, L]]] = defaultdict(list)
        for label, t in labelled:
            self.add(label, t)

    def add(self, label: L, t: torch.Tensor) -> None:
        self.add_span(label, byte_span(t))

    def add_span(self, label: L, span: Span | None) -> None:
        """Add a span read before (``byte_span``); it must still be the tensor's."""
        if span is not None and span[2] > span[1]:
            self._ranges[span[0]].append((span[1], span[2], label))

    def overlapping(self, t: torch.Tensor) -> list[L]:
        """The labels of every tensor added whose bytes intersect ``t``'s, in the order added."""
        span = byte_span(t)
        if span is None or span[2] <= span[1]:
            return []
        key, start, end = span
        return [label for s, e, label in self._ranges.get(key, ()) if start < e and s < end]

    def overlap(self, t: torch.Tensor) -> L | None:
        """The label of the first tensor added whose bytes intersect ``t``'s, or None."""
        found = self.overlapping(t)
        return found[0] if found else None
