"""Parameters and buffers of one module that share memory: refused at publish and at GERMINATE.

Why by memory as well as by identity: ``b.weight.data = a.weight.data`` makes two Parameter
objects over one storage, and ``register_buffer("ref", w.detach())`` a buffer over a
parameter's. ``torch.export`` saves such a module, and loads it, with the storage still shared
(tied weights by assignment, one Parameter under two names, load as two Parameters over one
storage too), but a seed never trains that: moved to another device each tensor is copied on
its own, and a seed trains a deep copy of the loaded kernel, where a Parameter's copy clones its
data. Tied parameters come apart, so the seed trains a different model than the one published,
and a buffer the loaded program holds as a view of a parameter (not a graph leaf) cannot be
copied at all. Two tensors overlap when their bytes intersect (``kasmina.utils.memory``, as
for parameter ownership); disjoint slices of one flat buffer do not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from kasmina.utils.memory import ByteRanges

__all__ = ["Overlap", "copy_splits", "module_tensors", "overlaps", "with_parameter"]


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
    memory overlaps, with the two tensors, the earlier first. What is not a tensor is passed
    over; tensors without storage of their own to compare (meta, sparse) are compared by
    identity only."""
    first_name: dict[int, str] = {}
    ranges: ByteRanges[tuple[str, torch.Tensor]] = ByteRanges()
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            continue
        if id(tensor) in first_name:
            yield Overlap(first_name[id(tensor)], name, True), tensor, tensor
            continue
        first_name[id(tensor)] = name
        for other_name, other in ranges.overlapping(tensor):
            yield Overlap(other_name, name, False), other, tensor
        ranges.add((name, tensor), tensor)


def copy_splits(named: Iterable[tuple[str, object]]) -> Overlap | None:
    """Two of the tensors in ``named`` (a loaded program's state) sharing memory that a seed
    cannot keep shared (distinct objects, one of them a Parameter, which a move or a copy
    clones), if any. Buffers over one storage stay shared in a copy, and one object under
    two names stays one."""
    for overlap, a, b in overlaps(named):
        if a is not b and with_parameter(a, b):
            return overlap
    return None


def with_parameter(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a pair of overlapping tensors holds a Parameter, which a move or a copy clones on
    its own (buffers over one storage stay shared in a copy)."""
    return isinstance(a, nn.Parameter) or isinstance(b, nn.Parameter)
