"""Where a tensor's bytes are: the one test of shared memory.

Identity is not enough: ``nn.Parameter(w.data)`` and ``b.weight.data = a.weight.data`` make new
tensor objects over an existing storage. Two tensors share memory when their byte ranges in one
storage intersect; disjoint slices of one flat buffer do not, and an empty tensor holds no byte.
Used for one owner per parameter (``isolation.ownership``), one manager per model
(``manager.exclusive``) and an artifact's tensors that a seed's copy would split
(``urza.aliasing``). The ranges are read from the tensors when they are added, never kept
across calls: a module converted in place (``host.half()`` swaps each parameter's ``.data``)
is compared where its memory is now.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Generic, TypeVar

import torch

__all__ = ["ByteRanges", "byte_span"]

L = TypeVar("L")
StorageKey = tuple[str, int]


def byte_span(t: torch.Tensor) -> tuple[StorageKey, int, int] | None:
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


class ByteRanges(Generic[L]):
    """The byte ranges of labelled tensors, by storage: which of them a tensor's bytes intersect."""

    def __init__(self, labelled: Iterable[tuple[L, torch.Tensor]] = ()) -> None:
        self._ranges: dict[StorageKey, list[tuple[int, int, L]]] = defaultdict(list)
        for label, t in labelled:
            self.add(label, t)

    def add(self, label: L, t: torch.Tensor) -> None:
        span = byte_span(t)
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
