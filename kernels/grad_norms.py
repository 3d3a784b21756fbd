"""Per-tensor L2 norms of many tensors: one launch per dtype group plus one tiny finishing launch.

Why a pointer/chunk table: a model has hundreds to thousands of parameter tensors, and one launch
per tensor (or a flat concatenation, which doubles memory traffic) wastes most of the time. The
host builds an int64 table of chunks ``(tensor index, element offset, length)`` per group and an
int64 table of data pointers. Each program of ``_sumsq_kernel`` loads its chunk's pointer, casts
it to the group's element type, and writes the chunk's scaled partial ``(m, s)`` to ``partials``.
``_finish_kernel`` (one program per tensor) combines that tensor's contiguous run of partials in
a fixed order, so results are deterministic (no float atomics), takes the square root and, for
the leak check, raises a device flag. Nothing waits on the host.

Why scaled: squaring in fp32 underflows below |x| ~ 1e-19 and overflows above ~ 1e19, so a
plain sum of squares turns a finite, representable norm into 0 or inf (a tiny leaked gradient
would read as "no leak", a large finite gradient as non-finite). So every partial is a scaled
pair ``(m, s)`` with ``sum(x^2) = m^2 * s``: ``m`` is a power of two (the largest not above the
chunk's max |x|, kept within [2^-126, 2^126]) and ``s = sum((x/m)^2)``, which is below
16 * CHUNK, and at least 1 unless the chunk is all zeros and subnormals. Powers of two make every
rescaling exact, and they are built from exponent bits, so there is no division. The finishing
step combines partials as ``M = max m_i``, ``S = sum s_i * (m_i/M)^2`` and returns
``M * sqrt(S)``: 0 only for all zeros, and for finite entries inf only when the true norm
exceeds the fp32 range. NaN and inf entries propagate into ``s`` as in a plain sum of squares.

A group is a (dtype, 16-byte aligned) pair: aligned tensors get vectorised loads, and a
misaligned view (``base[1:]``) only sends its own group to the scalar path.

Host time is what limits a call over a thousand small tensors, so the prepared launch (chunk
tables and the device pointer table) is cached. The key is the list's layout as the kernels
read it: the device, every tensor's data pointer, element count and dtype, and the shape and
strides of each one that is not contiguous (a dense permutation such as ``w.t()`` or a
channels_last weight is read in place as the same span of memory; other views are read from a
copy). A repeated call with the same tensors, or new tensors at the same addresses, therefore
only computes the key and launches. The cache is a small LRU (``_LAUNCHES``
entries); the chunk tables underneath are shared by every pointer set of the same structure
(element counts, dtypes, alignment) in a second small LRU (``_PLANS``), so fresh gradients each
step rebuild only the pointer table. An exact hit skips validation: its key can only match a
list that was validated when the entry was made (device address spaces are disjoint under
unified addressing, and the dtypes are part of the key). Validation is the op's contract for each
entry, which ``kasmina.ops.grad_norms`` passes in as ``check_entry`` on every call (one
definition of the supported dtypes and the error messages), then the data pointers, which only
this kernel needs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter, not_

import torch
import triton
import triton.language as tl
from kasmina.kernels.device import on_device

# The element type each group is loaded as: bf16 as its raw bits (see ``_fold``). The dtypes a
# caller may pass are the op's contract, checked by the caller's ``check_entry`` (see ``prepare``).
_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.uint16}
# Elements per program: enough work per program and enough programs per tensor. A multiple of 16
# (the kernel tells the compiler so) that keeps chunk starts at the tensor's 16-byte alignment.
CHUNK = 32768
BLOCK = 2048  # elements per loop step inside a program
FINISH_BLOCK = 256  # partials summed per loop step in the finishing kernel
ALIGNMENT = 16  # bytes: the widest vector load (4 x fp32, 8 x fp16/bf16)
_LAUNCHES = 8  # prepared launches kept (distinct pointer sets)
_PLANS = 16  # chunk-table plans kept (distinct list structures)

_EMPTY = torch.empty(0)  # stands in for ``None`` entries: zero elements, never dereferenced
_dtype_of = attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_is_contiguous = torch.Tensor.is_contiguous
_shape = attrgetter("shape")
_stride = torch.Tensor.stride


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


# ``tl.sum``'s and ``tl.max``'s own combine functions. Reducing with them directly compiles to
# exactly ``tl.sum``/``tl.max``, and the interpreter recognises them and reduces with numpy
# instead of re-entering the JIT in every program, which makes the CPU tests of thousands of
# programs two orders of magnitude faster.
_sum_combine = getattr(tl.standard, "_sum_combine", _add)
_max_combine = getattr(tl.standard, "_elementwise_max", _max)

# Scales are powers of two taken from fp32 exponent fields (bits 23..30, ``E << 23`` for a
# biased exponent E): ``bits(x) & _EXP_MASK`` read back as a float is 2^(E-127), the largest power
# of two not above |x| (for normal x), and it is monotonic in |x|. Multiplying by a power of two is
# exact unless the product leaves the normal range (then it is negligible, see below). Only
# bitwise ops, min/max and float multiplies are used: no division, and no integer add/sub (which
# the interpreter checks for overflow at great cost).
_EXP_MASK: tl.constexpr = tl.constexpr(0x7F800000)
# Scale fields are kept in [E = 1, E = 253], m in [2^-126, 2^126], so m and 1/m are normal.
# Below: a lane of zeros and subnormals (|x| < 2^-126) keeps m = 2^-126, and x/m in [2^-23, 1)
# keeps every subnormal input whole. Above: elements up to fp32's max (E = 254) scale to < 4, and
# inf and NaN (E = 255) scale to themselves, so they propagate through ``s`` as in a plain sum of
# squares.
_TOP: tl.constexpr = tl.constexpr(253 << 23)
# 1/m for such an m, exactly: XOR with _EXP_MASK turns the field E into 255 - E, that of 2/m, and
# halving that is exact (the result is normal). Written inline rather than as a jit helper: the
# interpreter re-patches triton.language on every call of a nested jit function, which is slow
# (``_fold`` is the one helper, called once per block).


@triton.jit
def _fold(m, s, raw, DTYPE: tl.constexpr):
    """Fold loaded elements ``raw`` into the per-lane states ``(m, s)``, sum(x^2) = m^2 * s.

    bf16 arrives as its raw bits (DTYPE uint16): shifted up by 16 they are its fp32 value,
    exactly, as the hardware conversion does. The interpreter's own bf16 conversion mangles
    subnormals (|x| < 2^-126), exactly the tiny entries a leak check must count.

    The new m is the larger of m and x's power of two (clamped to _TOP), the old s is rescaled
    by (m_old/m_new)^2 and (x/m_new)^2 is added. Both factors are exact unless they fall below
    the normal range; then the term is under 2^-126 of the lane's largest ((x/m)^2 >= 1 for the
    x that set m), and dropping it, or rounding it as a subnormal, is negligible even over 2^40
    terms.
    """
    if DTYPE == tl.uint16:
        x = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    fx = x.to(tl.int32, bitcast=True) & _EXP_MASK  # the sign bit is dropped
    fn = tl.minimum(tl.maximum(m.to(tl.int32, bitcast=True), fx), _TOP)
    inv = (fn ^ _EXP_MASK).to(tl.float32, bitcast=True) * 0.5  # 1/m_new
    y = x * inv  # x/m_new: exact, |y| < 4
    ratio = m * inv
    return fn.to(tl.float32, bitcast=True), s * (ratio * ratio) + y * y


# ``base`` (the group's first partial) depends on the list's make-up: specialised, as Triton does
# an int (equal to 1, a multiple of 16, neither), it made up to three compiles of each group's
# kernel, each one a JIT compile in the middle of training when a list of another make-up came.
@triton.jit(do_not_specialize=["base"])
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
    # One scaled state per lane, m starting at the floor 2^-126 (tl.zeros re-enters the JIT when
    # interpreted). Each lane folds at most CHUNK / BLOCK elements, each (x/m)^2 < 16: s stays
    # far below overflow.
    m = tl.full([BLOCK], 2.0**-126, dtype=tl.float32)
    s = tl.full([BLOCK], 0.0, dtype=tl.float32)
    full = length - length % BLOCK
    for start in range(0, full, BLOCK):  # whole blocks: no mask, so the loads vectorise
        m, s = _fold(m, s, tl.load(src + start + cols), DTYPE)
    tail = full + cols
    m, s = _fold(m, s, tl.load(src + tail, mask=tail < length, other=0), DTYPE)
    # Lanes to one pair: the chunk's scale is the largest lane scale.
    top = tl.reduce(m, 0, _max_combine)
    ratio = m * ((top.to(tl.int32, bitcast=True) ^ _EXP_MASK).to(tl.float32, bitcast=True) * 0.5)
    total = tl.reduce(s * (ratio * ratio), 0, _sum_combine)
    out = partials_ptr + 2 * (base + pid).to(tl.int64)  # (m, s): 2 slots per chunk
    tl.store(out, top)
    tl.store(out + 1, total)


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
    m = tl.full([BLOCK], 2.0**-126, dtype=tl.float32)  # tl.zeros re-enters the JIT (interpreted)
    s = tl.full([BLOCK], 0.0, dtype=tl.float32)
    for start in range(0, count, BLOCK):
        idx = start + cols
        mask = idx < count
        at = partials_ptr + 2 * (first + idx)
        mi = tl.load(at, mask=mask, other=2.0**-126)
        si = tl.load(at + 1, mask=mask, other=0.0)
        m_new = tl.maximum(m, mi)  # powers of two in [2^-126, 2^126]: never NaN
        inv = (m_new.to(tl.int32, bitcast=True) ^ _EXP_MASK).to(tl.float32, bitcast=True) * 0.5
        # Each s_i < 16 * CHUNK = 2^19, so finite sums of any count of partials cannot overflow;
        # a ratio below the normal range drops a negligible term, as in the chunk kernel.
        ratio, ratio_i = m * inv, mi * inv
        s = s * (ratio * ratio) + si * (ratio_i * ratio_i)
        m = m_new
    top = tl.reduce(m, 0, _max_combine)
    ratio = m * ((top.to(tl.int32, bitcast=True) ^ _EXP_MASK).to(tl.float32, bitcast=True) * 0.5)
    total = tl.reduce(s * (ratio * ratio), 0, _sum_combine)
    # norm = M * sqrt(S). M is a normal power of two and a nonzero S is >= 2^-46 (and finite
    # unless an entry is inf/NaN), so the product rounds once: a subnormal norm is kept, not
    # flushed, and only a true norm beyond fp32's range overflows to inf. NaN and inf in S pass
    # through (M is finite and nonzero); S = 0 gives 0.
    norm = tl.sqrt_rn(total) * top
    tl.store(norms_ptr + pid, norm)
    if HAS_FLAG:
        # NaN fails every comparison, so test it explicitly; +inf also exceeds any finite tol.
        bad = (norm > tol) | (norm != norm) | (norm == float("inf"))
        # Programs only ever write True, so the unsynchronised stores cannot disagree.
        tl.store(flag_ptr, bad, mask=bad)


@dataclass(frozen=True)
class _Group:
    dtype: torch.dtype
    aligned: bool  # every member's data pointer is a multiple of ALIGNMENT bytes
    table: torch.Tensor  # int64 [chunks, 3]: tensor index, element offset, length
    base: int  # index of this group's first chunk in ``partials``
    chunks: int


@dataclass(frozen=True)
class _Plan:
    """Chunk tables of one list structure (element counts, dtypes, alignment)."""

    groups: tuple[_Group, ...]
    first: torch.Tensor  # int64 [T]: index of each tensor's first partial
    count: torch.Tensor  # int64 [T]: number of partials (chunks) of each tensor
    total_chunks: int


@dataclass(frozen=True)
class Prepared:
    """Everything a launch needs: the plan, the device pointer table, and the tensors read.

    ``tensors`` holds the dense copies made of non-dense inputs (and the inputs themselves), so
    that the memory the pointer table names stays alive until the launches are queued.
    """

    plan: _Plan
    pointers: torch.Tensor  # int64 [T] on the device
    tensors: tuple[torch.Tensor, ...]


_launches: OrderedDict[tuple, tuple[_Plan, torch.Tensor]] = OrderedDict()
_plans: OrderedDict[tuple, _Plan] = OrderedDict()
_lock = threading.Lock()


# The caller's check of one entry ``(index, entry, device)``: raises ``ValueError`` naming it.
EntryCheck = Callable[[int, object, torch.device], None]


def _check(tensors: Sequence[object], device: torch.device, check_entry: EntryCheck | None) -> None:
    """Each entry: the caller's contract first (``check_entry``: type, dtype, device, layout),
    then what only this kernel needs, an address to read."""
    for i, t in enumerate(tensors):
        if t is None or t is _EMPTY:
            continue
        if check_entry is not None:
            check_entry(i, t, device)
        if t.numel() and not t.data_ptr():  # a ZeroTensor: the kernel would read address 0
            raise ValueError(f"tensors[{i}] has no storage to read (a ZeroTensor?)")


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


def _dense_span(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive slots from ``data_ptr`` (any order).

    True for a contiguous tensor and for dense permutations of one (``w.t()``): with strides
    >= 0, element 0 is the lowest address, and the sum of squares does not depend on the order.
    """
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _lru_put(cache: OrderedDict, key: tuple, value: object, limit: int) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


def _build_plan(
    numels: Sequence[int],
    dtypes: Sequence[torch.dtype],
    aligned: Sequence[bool],
    device: torch.device,
) -> _Plan:
    rows: dict[tuple[torch.dtype, bool], list[tuple[int, int, int]]] = {}
    for i, (n, dt, al) in enumerate(zip(numels, dtypes, aligned, strict=True)):
        if n:
            group_rows = rows.setdefault((dt, al), [])
            group_rows.extend((i, off, min(CHUNK, n - off)) for off in range(0, n, CHUNK))
    groups, first, count, base = [], [0] * len(numels), [0] * len(numels), 0
    for (dt, al), group_rows in rows.items():
        for pos, (i, off, _) in enumerate(group_rows):
            if off == 0:
                first[i] = base + pos
            count[i] += 1
        table = _to_device(group_rows, device)
        groups.append(_Group(dt, al, table, base, len(group_rows)))
        base += len(group_rows)
    meta = _to_device([first, count], device)
    return _Plan(tuple(groups), meta[0], meta[1], base)


def _key_parts(
    ts: Sequence[torch.Tensor],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[torch.dtype, ...], bool]:
    """Data pointers, element counts, dtypes, and whether every tensor is contiguous.

    One C-level pass per attribute: a ``TypeError`` means an entry is not a tensor.
    """
    return (
        tuple(map(_data_ptr, ts)),
        tuple(map(_numel, ts)),
        tuple(map(_dtype_of, ts)),
        all(map(_is_contiguous, ts)),
    )


def _layout(ts: Sequence[torch.Tensor]) -> tuple:
    """The indices, shapes and strides of the entries that are not contiguous: with the
    pointers, element counts and dtypes, all that the kernels' reading of the list depends on
    (whether each view is read in place or copied). C-level passes, as ``_key_parts``."""
    odd = list(map(not_, map(_is_contiguous, ts)))
    views = list(compress(ts, odd))
    return (
        tuple(compress(range(len(ts)), odd)),
        tuple(map(_shape, views)),
        tuple(map(_stride, views)),
    )


def _cached(key: tuple) -> tuple[_Plan, torch.Tensor] | None:
    with _lock:
        hit = _launches.get(key)
        if hit is not None:
            _launches.move_to_end(key)
    return hit


def prepare(
    tensors: Sequence[torch.Tensor | None],
    device: torch.device,
    check_entry: EntryCheck | None = None,
) -> Prepared:
    """The host side of one call: the (cached) plan and device pointer table for ``tensors``.

    A list seen before costs four attribute reads per tensor, a tuple hash and a dict lookup
    (plus one list pass when it holds ``None`` or a non-contiguous tensor); a new list is
    validated (``check_entry`` on each entry, then the data pointers; without ``check_entry``,
    as in the tests' direct calls, the pointers only), and a new structure builds its chunk
    tables.
    """
    ts: Sequence = tensors
    try:
        ptrs, numels, dtypes, dense = _key_parts(ts)
    except (TypeError, RuntimeError):  # None, or a tensor without storage (sparse)
        ts = [_EMPTY if t is None else t for t in tensors]
        try:
            ptrs, numels, dtypes, dense = _key_parts(ts)
        except (TypeError, RuntimeError):
            _check(tensors, device, check_entry)  # names the entry that is not a (dense) tensor
            raise
    layout = () if dense else _layout(ts)
    key = (device, ptrs, numels, dtypes, layout)
    hit = _cached(key)
    if hit is None:
        _check(ts, device, check_entry)
        if not dense:
            flags = list(map(_is_contiguous, ts))
            read = [
                t if ok or _dense_span(t) else t.contiguous()
                for t, ok in zip(ts, flags, strict=True)
            ]
            if any(r is not t for r, t in zip(read, ts, strict=True)):
                ts = read  # copies have new addresses and layouts
                ptrs = tuple(map(_data_ptr, ts))
                key = (device, ptrs, numels, dtypes, _layout(ts))
                hit = _cached(key)
    if hit is None:
        aligned = tuple(p % ALIGNMENT == 0 for p in ptrs)
        structure = (device, numels, dtypes, aligned)
        with _lock:
            plan = _plans.get(structure)
        if plan is None:
            plan = _build_plan(numels, dtypes, aligned, device)
        hit = (plan, _to_device(list(ptrs), device))
        with _lock:
            _lru_put(_plans, structure, plan, _PLANS)
            _lru_put(_launches, key, hit, _LAUNCHES)
    return Prepared(hit[0], hit[1], tuple(ts))


def tensor_norms(
    tensors: Sequence[torch.Tensor | None],
    device: torch.device,
    tol: float | None = None,
    check_entry: EntryCheck | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 L2 norm of each tensor (``None`` -> 0) and, when ``tol`` is given, the leak flag.

    The flag is a 0-d bool device tensor: any norm > ``tol`` or not finite. Dense tensors are
    read in place whatever their strides; other views are copied to a dense buffer first
    (gradients and parameters never are). ``check_entry`` is the op's check of one entry
    (``kasmina.ops.grad_norms``), run on every list not prepared before (``prepare``).
    """
    n = len(tensors)
    norms = torch.empty(n, dtype=torch.float32, device=device)
    flag = torch.zeros((), dtype=torch.bool, device=device) if tol is not None else None
    if n == 0:
        return norms, flag
    prep = prepare(tensors, device, check_entry)
    plan = prep.plan
    partials = torch.empty(2 * max(plan.total_chunks, 1), dtype=torch.float32, device=device)
    with on_device(device):
        for g in plan.groups:
            _sumsq_kernel[(g.chunks,)](
                g.table,
                prep.pointers,
                partials,
                g.base,
                DTYPE=_TL_DTYPE[g.dtype],
                ALIGNED=g.aligned,
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
