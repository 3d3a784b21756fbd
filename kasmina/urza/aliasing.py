"""Parameters and buffers of one module that share memory: refused at publish and at GERMINATE.

Why by memory as well as by identity: ``b.weight.data = a.weight.data`` makes two Parameter
objects over one storage, and ``register_buffer("ref", w.detach())`` a buffer over a
parameter's. ``torch.export`` saves such a module, and loads it, with the storage still shared
(tied weights by assignment, one Parameter under two names, load as two Parameters over one
storage too), but a seed never trains that: moved to another device each tensor is copied on
its own, and a seed trains a deep copy of the loaded kernel, where a Parameter's copy clones its
data. Tied parameters come apart, so the seed trains a different model than the one published,
and a buffer the loaded program holds as a view of a parameter (not a graph leaf) cannot be
copied at all. Two tensors overlap when their byte ranges in one storage intersect; disjoint
slices of one flat buffer do not (the rule ``kasmina.isolation`` applies to parameter
ownership, a package of the same rank, which this one does not import).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["Overlap", "copy_splits", "module_tensors", "overlaps"]


class Overlap(NamedTuple):
    """Two names (in registration order) whose tensors share memory; ``same``: one tensor."""

    first: str
    second: str
    same: bool


def module_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``module``'s parameters and buffers, all of them together, under every name (a
    submodule used twice, a tensor registered as a parameter and as a buffer)."""
    return [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]


def overlaps(
    named: Iterable[tuple[str, object]],
) -> Iterator[tuple[Overlap, torch.Tensor, torch.Tensor]]:
    """Every pair of the tensors in ``named`` that is one tensor under two names or whose
    memory overlaps, with the two tensors. What is not a tensor is passed over; tensors
    without storage of their own to compare (meta, sparse) are compared by identity only."""
    tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor)]
    first_name: dict[int, str] = {}
    spans: dict[tuple[str, int], list[tuple[int, int, int]]] = defaultdict(list)
    for order, (name, tensor) in enumerate(tensors):
        if id(tensor) in first_name:
            yield Overlap(first_name[id(tensor)], name, True), tensor, tensor
            continue
        first_name[id(tensor)] = name
        span = _span(tensor)
        if span is not None and span[2] > span[1]:
            spans[span[0]].append((span[1], span[2], order))
    for extents in spans.values():
        active: list[tuple[int, int]] = []  # (end, order) of the extents the sweep is inside
        for start, end, order in sorted(extents):
            active = [(e, o) for e, o in active if e > start]
            for _, other in active:
                a, b = sorted((other, order))
                yield Overlap(tensors[a][0], tensors[b][0], False), tensors[a][1], tensors[b][1]
            active.append((end, order))


def copy_splits(named: Iterable[tuple[str, object]]) -> Overlap | None:
    """Two of the tensors in ``named`` (a loaded program's state) sharing memory that a seed
    cannot keep shared (distinct objects, one of them a Parameter, which a move or a copy
    clones), if any. Buffers over one storage stay shared in a copy, and one object under
    two names stays one."""
    for overlap, a, b in overlaps(named):
        if a is not b and (isinstance(a, nn.Parameter) or isinstance(b, nn.Parameter)):
            return overlap
    return None


def _span(tensor: torch.Tensor) -> tuple[tuple[str, int], int, int] | None:
    """``(storage key, start, end)``: the byte range ``tensor`` occupies in its storage; None
    for a tensor whose memory cannot be compared (meta: every one at address 0; sparse)."""
    if tensor.is_meta:
        return None
    try:
        key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        start = tensor.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # no storage of its own
        return None
    if tensor.numel() == 0:
        return key, start, start
    sizes = zip(tensor.shape, tensor.stride(), strict=True)
    span = sum((size - 1) * stride for size, stride in sizes) + 1
    return key, start, start + span * tensor.element_size()
