"""The layout of ``kd_kl_loss``'s student gradient: ``grad_strides`` (the student's own strides
when they are compact, else contiguous), shared by both backends and the compile-time fake."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["grad_strides", "new_grad"]


def _merged_leading_dims(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """How many leading dims remain after merging those that are contiguous across each
    other (size-1 dims dropped): the kernels address at most two."""
    count, outer = 0, None
    for size, stride in zip(shape, strides, strict=True):
        if size == 1:
            continue
        if outer is None or outer != stride * size:
            count += 1
        outer = stride
    return count


def grad_strides(student: Tensor) -> tuple[int, ...]:
    """Strides of the student gradient the op returns: the student's own when they are compact
    (unit last stride, no overlap, at most two leading dims after merging, and a span at most
    1/8 above ``numel``, as for ``logits[:, :-1]``), else contiguous. The gradient rows then
    share the student rows' 16-byte phase, so the kernel's stores stay vectorised for odd V.
    A pure function of shape and strides: the compile-time fake and both backends agree."""
    shape, strides = tuple(student.shape), tuple(student.stride())
    dense = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        dense[i] = dense[i + 1] * max(shape[i + 1], 1)
    numel = math.prod(shape)
    if numel == 0 or strides == tuple(dense) or strides[-1] != 1:
        return tuple(dense)
    if _merged_leading_dims(shape[:-1], strides[:-1]) > 2:
        return tuple(dense)
    reach = 1
    for stride, size in sorted((st, n) for st, n in zip(strides, shape, strict=True) if n > 1):
        if stride < reach:  # overlapping, e.g. an expanded dim (stride 0)
            return tuple(dense)
        reach = stride * size
    span = 1 + sum((n - 1) * st for st, n in zip(strides, shape, strict=True))
    return strides if span <= numel + numel // 8 else tuple(dense)


def new_grad(student: Tensor) -> Tensor:
    """An uninitialised student gradient laid out as ``grad_strides(student)``."""
    return torch.empty_strided(
        student.shape, grad_strides(student), dtype=student.dtype, device=student.device
    )
