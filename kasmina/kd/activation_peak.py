"""How many bytes a teacher's forward adds beside its weights (``CheckpointedTeacher``'s
memory measurement, docs/design.md §7): on CUDA the allocator's peak over the forward
(``cuda_activation_peak``); elsewhere, with no allocator statistics to read, the largest
input-and-output footprint of any one module (``hooked_activation_peak``), each tensor counted
by the bytes it spans in its storage, overlapping views once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["cuda_activation_peak", "hooked_activation_peak"]


def _tensor_spans(obj: object, spans: dict[int, list[tuple[int, int]]]) -> None:
    """Note in ``spans`` (storage -> byte ranges) the bytes every tensor inside ``obj`` (tuples,
    lists, dicts) spans in its storage: a batch sliced from a dataset in memory is the batch,
    not the dataset, and the views a module splits its output into (``qkv.chunk(3)``) are all
    of it (``_span_bytes`` takes the union). A nested tensor (``nn.TransformerEncoder``'s fast
    path given a padding mask) has no sizes or strides of its own: its components are counted."""
    if isinstance(obj, torch.Tensor) and obj.is_nested:
        _tensor_spans(obj.unbind(), spans)  # strided views of its one buffer
    elif isinstance(obj, torch.Tensor):
        if obj.numel():
            size = obj.element_size()
            start = obj.storage_offset() * size
            reach = sum((n - 1) * abs(s) for n, s in zip(obj.shape, obj.stride(), strict=True))
            ptr = obj.untyped_storage().data_ptr()
            spans.setdefault(ptr, []).append((start, start + (reach + 1) * size))
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _tensor_spans(item, spans)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensor_spans(item, spans)


def _span_bytes(spans: dict[int, list[tuple[int, int]]]) -> int:
    """The bytes the ranges of each storage cover, overlaps once."""
    total = 0
    for ranges in spans.values():
        end = 0
        for lo, hi in sorted(ranges):
            total += max(0, hi - max(lo, end))
            end = max(end, hi)
    return total


def cuda_activation_peak(device: torch.device, run: Callable[[], torch.Tensor]) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = run()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - before


def hooked_activation_peak(model: nn.Module, run: Callable[[], torch.Tensor]) -> int:
    largest = 0

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        nonlocal largest
        spans: dict[int, list[tuple[int, int]]] = {}
        _tensor_spans(inputs, spans)
        _tensor_spans(output, spans)
        largest = max(largest, _span_bytes(spans))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return largest
