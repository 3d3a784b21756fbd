"""Row addressing for the kernels that stream over the last dim of row-aligned tensors (the
KD loss's student, teacher and gradient): leading dims merged to at most two, strided rows
read in place, and 16-byte alignment proven before a kernel is told of it.

A row ``i`` of such a tensor starts at ``off + (i // R1)·st0 + (i % R1)·st1`` (``row_layout``);
its body may be loaded as 16-byte vectors only where the base is aligned and the row's phase
modulo ``VEC`` matches the student's (``plan_rows``), and anything else is read one element at
a time or, past two leading dims, copied (``readable_rows``).
"""

from __future__ import annotations

import logging
import math

import torch

logger = logging.getLogger(__name__)

VEC_BYTES = 16  # widest vector load


def row_layout(
    lead: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[int, list[tuple[int, int]]] | None:
    """Merge the leading dims ``lead`` of several tensors (their leading strides in
    ``strides``) into at most two, ``[rows // R1, R1]``: returns ``(R1, [(st0, st1), ...])``,
    or None when more than two dims remain (the caller copies). Dims merge where every tensor
    is contiguous across them; size-1 dims are dropped."""
    merged: list[tuple[int, list[int]]] = []
    for i, size in enumerate(lead):
        if size == 1:
            continue
        sts = [st[i] for st in strides]
        if merged and all(o == s * size for o, s in zip(merged[-1][1], sts, strict=True)):
            merged[-1] = (merged[-1][0] * size, sts)
        else:
            merged.append((size, sts))
    if len(merged) > 2:
        return None
    if not merged:
        return 1, [(0, 0)] * len(strides)
    if len(merged) == 1:
        return merged[0][0], [(0, s) for s in merged[0][1]]
    return merged[1][0], list(zip(merged[0][1], merged[1][1], strict=True))


def kernel_layout_ok(x: torch.Tensor) -> bool:
    """Whether the kernels read ``x`` in place: unit stride in the last dim and at most two
    leading dims after merging."""
    return x.stride(-1) == 1 or x.shape[-1] == 1


def aligned_base(x: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """``(base, offset, aligned)``: a tensor whose data pointer is 16-byte aligned and the
    element offset of ``x``'s first element from it (``base`` shares ``x``'s storage and
    starts up to 15 bytes before it), or ``(x, 0, False)`` when that is impossible."""
    size = x.element_size()
    addr = x.data_ptr()
    if addr % VEC_BYTES == 0:
        return x, 0, True
    mis = (addr % VEC_BYTES) // size
    if addr % size or x.storage_offset() < mis:
        return x, 0, False
    return x.as_strided((1,), (1,), x.storage_offset() - mis), mis, True


def plan_rows(tensors: list[torch.Tensor]) -> tuple[list, int, int, list[bool]] | None:
    """Kernel addressing for row-aligned tensors (student first): base pointers, row offsets
    and strides, R1, VEC (elements per 16 bytes of the narrowest dtype) and, per tensor,
    whether its body addresses are provably 16-byte aligned: its base is aligned and, for every
    row, its row offset is congruent to the student's modulo VEC. The student's head makes the
    student's body offsets multiples of VEC, so the same columns are aligned in that tensor
    too. None when the leading dims do not merge to two."""
    student = tensors[0]
    lead = tuple(student.shape[:-1])
    layout = row_layout(lead, [tuple(t.stride()[:-1]) for t in tensors])
    if layout is None:
        return None
    r1, row_strides = layout
    rows = math.prod(lead)
    vec = VEC_BYTES // min(t.element_size() for t in tensors)
    bases = [aligned_base(t) for t in tensors]
    s_off = bases[0][1]
    s_st0, s_st1 = row_strides[0]
    args, aligned = [], []
    for (base, off, ok), (st0, st1) in zip(bases, row_strides, strict=True):
        same_phase = (off - s_off) % vec == 0
        same_phase &= rows <= r1 or (st0 - s_st0) % vec == 0
        same_phase &= r1 == 1 or (st1 - s_st1) % vec == 0
        args.append((base, off, st0, st1))
        aligned.append(ok and bases[0][2] and same_phase)
    return args, r1, vec, aligned


def row_vector(x: torch.Tensor) -> torch.Tensor:
    """``x`` (a mask or ``grad_output``, one element per row) as the dense 1-d vector the
    kernels index by row (``ptr + row``): ``reshape(-1)`` keeps a view where it can, and a
    view may be strided (``mask[::2]``, ``m[..., 0]``) or expanded (``.sum()``'s backward hands
    a stride-0 ``grad_output``), so it is copied then; rows-sized, so the copy is cheap."""
    return x.reshape(-1).contiguous()


def readable_rows(
    student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits as the kernels read them: as given when each has a unit last stride and the
    pair merges to two leading dims, else contiguous copies (documented)."""
    lead = tuple(student.shape[:-1])
    if (
        kernel_layout_ok(student)
        and kernel_layout_ok(teacher)
        and row_layout(lead, [tuple(student.stride()[:-1]), tuple(teacher.stride()[:-1])])
    ):
        return student, teacher
    logger.debug("row kernels: copying logits, strides %s, %s", student.stride(), teacher.stride())
    return student.contiguous(), teacher.contiguous()
