"""How ``evaluate_seeds`` reads a validation batch (docs/design.md §3, gate G5): checked to be
an ``(inputs, targets)`` pair, its tensors moved to the model's device (and copied for each
forward that measures a seed taken out), and weighed by its batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.nn.utils.rnn import PackedSequence

__all__ = ["batch_size", "checked_pair", "copied", "moved"]


def checked_pair(batch: Any, index: int) -> tuple[Any, Any]:
    """``batch`` (the ``index``-th, from 1) as ``(inputs, targets)``: a tuple or list of two. A
    ``TypeError`` naming it otherwise, before it is run: a batch of inputs alone raised "too many
    values to unpack" from inside the measurement, and one of two rows (a tensor, a mapping of
    two keys) was taken apart into inputs and targets and measured."""
    if isinstance(batch, tuple | list) and len(batch) == 2:  # a PackedSequence holds four
        return batch[0], batch[1]
    kind = type(batch).__name__
    size = f" of {len(batch)}" if isinstance(batch, tuple | list) else ""
    raise TypeError(
        f"batches must yield (inputs, targets) pairs, got a {kind}{size} as batch {index}: "
        "pair each batch of inputs with its targets (a mapping of keyword inputs as (mapping, "
        "targets), or (mapping, None) for a loss_fn that reads the model's own loss)"
    )


def moved(value: Any, device: torch.device) -> Any:
    """``value`` with its tensors on ``device``: a tensor, a ``PackedSequence``, the items of a
    tuple or list (a namedtuple rebuilt field by field) and a mapping's values; else as it is."""
    return _leaves_mapped(value, lambda leaf: leaf.to(device))


def copied(value: Any) -> Any:
    """``value`` with its tensors cloned, walked as ``moved`` walks it: what a forward that
    changes its inputs in place (``x.mul_(...)`` preprocessing), or a loss its targets, may
    change, leaving ``value``. A ``PackedSequence``'s indices are never written: its data only."""

    def clone(leaf: torch.Tensor | PackedSequence) -> Any:
        if isinstance(leaf, PackedSequence):
            return leaf._replace(data=leaf.data.clone())
        return leaf.clone()

    return _leaves_mapped(value, clone)


def _leaves_mapped(value: Any, fn: Callable[[torch.Tensor | PackedSequence], Any]) -> Any:
    """``value`` with ``fn`` applied to each tensor and ``PackedSequence`` in it, through tuples
    and lists (a namedtuple rebuilt field by field) and a mapping's values."""
    if isinstance(value, torch.Tensor | PackedSequence):
        return fn(value)
    if isinstance(value, tuple | list):
        items = [_leaves_mapped(v, fn) for v in value]
        if hasattr(value, "_fields"):  # a namedtuple takes its fields as arguments
            return type(value)(*items)
        return type(value)(items)
    if isinstance(value, Mapping):  # keyword inputs (a tokenizer's BatchEncoding)
        return {k: _leaves_mapped(v, fn) for k, v in value.items()}
    return value


def batch_size(inputs: Any, targets: Any) -> int:
    """The targets' batch size, else the inputs'. A sequence of tensors whose rows agree is
    batched targets side by side, unless it is one 2-D or higher tensor per input sample (per
    image boxes or masks) with a row count that is not the batch: per-image boxes that happen
    to be equal in number (an image a batch, or none with objects) weigh their images. The
    samples are the inputs' batch, or their number when the inputs are a sequence of samples
    (torchvision's list of images); flat side-by-side targets (per-token labels and weights)
    keep their rows."""
    size = _leading(targets)
    if (
        isinstance(targets, tuple | list)
        and targets
        and all(isinstance(t, torch.Tensor) and t.dim() > 1 for t in targets)
        and size != len(targets)
    ):
        listed = isinstance(inputs, list) and len(inputs) == len(targets)
        if listed or _leading(inputs) == len(targets):
            return len(targets)
    if size is not None:
        return size
    shown = _leading(inputs)
    return 1 if shown is None else shown


def _leading(value: Any) -> int | None:
    """The batch size ``value`` shows: a tensor's first dimension; a mapping's first value that
    has one (a 0-d flag or a scalar has none); for a sequence, its tensors' common first
    dimension (batched targets side by side), else the number of its items when they are
    per-sample ones: dicts (a detection batch's targets), tensors of different lengths, plain
    numbers or strings; else its first item's."""
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else None
    if isinstance(value, PackedSequence):  # its first time step holds every sequence
        return int(value.batch_sizes[0]) if len(value.batch_sizes) else 0
    if isinstance(value, tuple | list):
        sizes = {int(v.shape[0]) for v in value if isinstance(v, torch.Tensor) and v.dim() > 0}
        if len(sizes) == 1:
            return sizes.pop()
        if len(sizes) > 1 or (value and all(isinstance(v, _PER_SAMPLE) for v in value)):
            return len(value)
        return next((n for n in map(_leading, value) if n is not None), None)
    if isinstance(value, Mapping):
        return next((n for n in map(_leading, value.values()) if n is not None), None)
    return None


# What a sequence of per-sample items holds (a batch size is its length), besides tensors.
_PER_SAMPLE = (Mapping, str, bytes, int, float, complex, torch.Tensor)
