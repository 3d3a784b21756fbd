"""Per-tensor L2 norms of many tensors: one launch per dtype plus one tiny finishing launch.

Why a pointer/chunk table: a model has hundreds to thousands of parameter tensors, and one launch
per tensor (or a flat concatenation, which doubles memory traffic) wastes most of the time. The
host builds, once per list shape, an int64 table of chunks ``(tensor index, element offset,
length)`` per dtype and an int64 table of data pointers. Each program of ``_sumsq_kernel`` loads
its chunk's pointer, casts it to the dtype's pointer type, and writes the chunk's fp32 sum of
squares to ``partials``. ``_finish_kernel`` (one program per tensor) sums that tensor's contiguous
run of partials in a fixed order, so results are deterministic (no float atomics), takes the
square root and, for the leak check, raises a device flag. Nothing waits on the host.

The plan (chunk tables) is cached per list structure (device, sizes, dtypes, layout); the pointer
table is rebuilt only when the pointers change. A cache hit skips validation: the key can only
match a list that was validated when the plan was built.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from operator import attrgetter

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# Elements per program: enough work per program and enough programs per tensor. A multiple of 16
# (the kernel tells the compiler so) that keeps chunk starts at the tensor's 16-byte alignment.
CHUNK = 32768
BLOCK = 2048  # elements per loop step inside a program
FINISH_BLOCK = 256  # partials summed per loop step in the finishing kernel
_MAX_PLANS = 16

_EMPTY = torch.empty(0)  # stands in for ``None`` entries: zero elements, never dereferenced
_dtype_of = attrgetter("dtype")


@triton.jit
def _add(a, b):
    return a + b


# ``tl.sum``'s own combine function. Reducing with it directly compiles to exactly ``tl.sum``,
# and the interpreter recognises it and sums with numpy instead of re-entering the JIT in every
# program, which makes the CPU tests of thousands of programs two orders of magnitude faster.
_sum_combine = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _sumsq_kernel(
    table_ptr,
    ptrs_ptr,
    partials_ptr,
    base,
    DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + pid.to(tl.int64) * 3
    tensor_idx = tl.load(row)
    offset = tl.multiple_of(tl.load(row + 1), 16)  # chunks start at multiples of CHUNK
    length = tl.load(row + 2)
    src = tl.load(ptrs_ptr + tensor_idx).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # A pointer loaded from memory has no known alignment; without this hint (checked on
        # the host) the loads would not vectorise.
        src = tl.multiple_of(src, 16)
    src += offset
    cols = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0.0, dtype=tl.float32)  # tl.zeros re-enters the JIT when interpreted
    full = length - length % BLOCK
    for start in range(0, full, BLOCK):  # whole blocks: no mask, so the loads vectorise
        x = tl.load(src + start + cols).to(tl.float32)
        acc += x * x
    tail = full + cols
    x = tl.load(src + tail, mask=tail < length, other=0.0).to(tl.float32)
    acc += x * x
    tl.store(partials_ptr + base + pid, tl.reduce(acc, 0, _sum_combine))


@triton.jit
def _finish_kernel(
    partials_ptr,
    first_ptr,
    count_ptr,
    norms_ptr,
    flag_ptr,
    tol,
    HAS_FLAG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    first = tl.load(first_ptr + pid)
    count = tl.load(count_ptr + pid)
    cols = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], 0.0, dtype=tl.float32)  # tl.zeros re-enters the JIT when interpreted
    for start in range(0, count, BLOCK):
        idx = start + cols
        acc += tl.load(partials_ptr + first + idx, mask=idx < count, other=0.0)
    norm = tl.sqrt(tl.reduce(acc, 0, _sum_combine))
    tl.store(norms_ptr + pid, norm)
    if HAS_FLAG:
        # NaN fails every comparison, so test it explicitly; +inf also exceeds any finite tol.
        bad = (norm > tol) | (norm != norm) | (norm == float("inf"))
        # Programs only ever write True, so the unsynchronised stores cannot disagree.
        tl.store(flag_ptr, bad, mask=bad)


@dataclass
class _Group:
    dtype: torch.dtype
    table: torch.Tensor  # int64 [chunks, 3]: tensor index, element offset, length
    base: int  # index of this group's first chunk in ``partials``
    chunks: int
    members: list[int]  # indices of the tensors with at least one chunk


@dataclass
class _Plan:
    groups: list[_Group]
    first: torch.Tensor  # int64 [T]: index of each tensor's first partial
    count: torch.Tensor  # int64 [T]: number of partials (chunks) of each tensor
    total_chunks: int
    # (pointer values, int64 [T] device copy, per group: all 16-byte aligned), replaced as one
    # object so that threads never mix the parts of two different pointer sets
    pointers: tuple[tuple[int, ...], torch.Tensor, list[bool]] | None = None


_plans: dict[tuple, _Plan] = {}
_lock = threading.Lock()


def _check(tensors: Sequence[torch.Tensor], device: torch.device) -> None:
    for i, t in enumerate(tensors):
        if t is _EMPTY:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"tensors[{i}] must be a Tensor or None, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tensors[{i}] must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device}, expected {device}")


def _to_device(values: list, device: torch.device) -> torch.Tensor:
    """An int64 host table on ``device`` without a host sync.

    A plain ``.to("cuda")`` copies from pageable memory, which makes the host wait for the whole
    stream to drain (the backward pass the leak check runs after). A pinned staging buffer and an
    asynchronous copy do not; the caching host allocator keeps the buffer until the copy is done.
    """
    host = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _build_plan(
    numels: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device
) -> _Plan:
    rows: dict[torch.dtype, list[tuple[int, int, int]]] = {}
    for i, (n, dt) in enumerate(zip(numels, dtypes, strict=True)):
        for off in range(0, n, CHUNK):
            rows.setdefault(dt, []).append((i, off, min(CHUNK, n - off)))
    groups, first, count, base = [], [0] * len(numels), [0] * len(numels), 0
    for dt, group_rows in rows.items():
        members = []
        for pos, (i, off, _) in enumerate(group_rows):
            if off == 0:
                first[i] = base + pos
                members.append(i)
            count[i] += 1
        table = _to_device(group_rows, device)
        groups.append(_Group(dt, table, base, len(group_rows), members))
        base += len(group_rows)
    meta = _to_device([first, count], device)
    return _Plan(groups, meta[0], meta[1], base)


def _plan_for(
    tensors: list[torch.Tensor], device: torch.device
) -> tuple[_Plan, torch.Tensor, list[bool]]:
    """The cached plan for this list structure and the device table of its data pointers.

    Validation runs whenever the plan or the pointers are new: an exact hit can only repeat a
    list that was validated (device address spaces are disjoint under unified addressing).
    """
    try:
        numels = tuple(map(torch.Tensor.numel, tensors))
        dtypes = tuple(map(_dtype_of, tensors))
        ptrs_key = tuple(map(torch.Tensor.data_ptr, tensors))
    except TypeError:
        _check(tensors, device)  # raises the clear error for the entry that is not a tensor
        raise
    key = (device, numels, dtypes)
    with _lock:
        plan = _plans.get(key)
    pointers = plan.pointers if plan is not None else None
    if pointers is not None and pointers[0] == ptrs_key:
        assert plan is not None
        return plan, pointers[1], pointers[2]
    _check(tensors, device)
    if plan is None:
        plan = _build_plan(numels, dtypes, device)
        with _lock:
            if len(_plans) >= _MAX_PLANS:
                _plans.pop(next(iter(_plans)))
            _plans[key] = plan
    ptrs = _to_device(list(ptrs_key), device)
    aligned = [all(ptrs_key[i] % 16 == 0 for i in g.members) for g in plan.groups]
    plan.pointers = (ptrs_key, ptrs, aligned)
    return plan, ptrs, aligned


def tensor_norms(
    tensors: Sequence[torch.Tensor | None],
    device: torch.device,
    tol: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 L2 norm of each tensor (``None`` -> 0) and, when ``tol`` is given, the leak flag.

    The flag is a 0-d bool device tensor: any norm > ``tol`` or not finite. Non-contiguous
    tensors are copied to a contiguous buffer first (gradients and parameters never are).
    """
    ts = [_EMPTY if t is None else t for t in tensors]
    try:
        contiguous = all(map(torch.Tensor.is_contiguous, ts))
    except TypeError:
        _check(ts, device)
        raise
    if not contiguous:
        ts = [t.contiguous() for t in ts]
    n = len(ts)
    norms = torch.empty(n, dtype=torch.float32, device=device)
    flag = torch.zeros((), dtype=torch.bool, device=device) if tol is not None else None
    if n == 0:
        return norms, flag
    plan, ptrs, aligned = _plan_for(ts, device)
    partials = torch.empty(max(plan.total_chunks, 1), dtype=torch.float32, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        for g, g_aligned in zip(plan.groups, aligned, strict=True):
            _sumsq_kernel[(g.chunks,)](
                g.table,
                ptrs,
                partials,
                g.base,
                DTYPE=_TL_DTYPE[g.dtype],
                ALIGNED=g_aligned,
                BLOCK=BLOCK,
            )
        _finish_kernel[(n,)](
            partials,
            plan.first,
            plan.count,
            norms,
            flag if flag is not None else norms,
            float(tol) if tol is not None else 0.0,
            HAS_FLAG=tol is not None,
            BLOCK=FINISH_BLOCK,
        )
    return norms, flag
