"""Triton kernels for ``kd_kl_loss``: per-row ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` and its
student gradient, streaming over the vocabulary (docs/design.md §2).

Bytes. With ``N`` the size of one logits tensor, forward + backward moves 5N: the forward reads
the student and the teacher once (2N) and writes only per-row statistics (16 bytes a row); the
backward reads both again and writes the gradient once (3N), already multiplied by
``grad_output``. No logits-sized buffer exists between the two passes, and the backward
allocates exactly one (the gradient). Strided logits such as ``logits[:, :-1]`` are read through
their row strides (up to two leading dims after merging), never copied.

Forward, per row, in base 2, with ``k = log2(e)/T``: every exponential is one ``exp2`` of a
scaled logit difference. Every lane of the block keeps its own running state over the elements
it sees: the maxima ``m_a, m_b`` (raw logits), the sums ``z_a = Σ 2^((s-m_a)·k)`` and
``z_b = Σ 2^((t-m_b)·k)``, and the cross term ``x = Σ 2^((t-m_b)·k)·((t-r_b) - (s-r_a))``,
``r_a, r_b`` the lane's anchors (its first finite logit of each side). A new element costs one
``exp2`` per side: with ``d = v - m``, ``e = 2^(-|d|·k)`` is either the new element's weight
(``v <= m``) or the factor that rescales the old sum (``v > m``, and ``v`` becomes the lane's
maximum). The loop body has no block reduction and so no barrier; the lanes are merged once
per row (two tuple reductions), ``M = max m``, ``Z = Σ z·2^((m-M)·k)`` and the cross terms
re-anchored on the row's maxima, ``X = Σ (x + z_b·((r_b - M_b) - (r_a - M_a)))·2^((m_b-M_b)·k)``.
Then::

    row_loss = T²·ln2·(k·X/Z_b + log2(Z_a/Z_b))

since ``KL = Σ p_t (log p_t - log p_s) = ln2·(k·Σ p_t (t - s) - lse_b + lse_a)`` with
``lse = k·M + log2 Z``, and ``Σ p_t = 1`` turns ``k·Σ p_t (t - s) + k·(M_a - M_b)`` into
``k·Σ p_t ((t - M_b) - (s - M_a))``.

Precision: every difference is taken off an anchor of its own side before anything else.
An exponent is ``fl(fl(v - m)·k)``: its error is relative to ``|v - m|``, nil at the maximum,
about ``|v - M|·k·2^-23`` elsewhere, where the weight ``2^(-|v - M|·k)`` makes it harmless,
whatever the logits' offset and ``T``. A product first, ``k·v - k·M``, carries ``ulp(k·v)/2``
in every exponent instead, which grows with the offset and as ``1/T`` (with logits near 1000
at ``T = 1`` the old kernels left each row an error near 1e-4 where the KL was 1e-7). The
cross term's ``(t - r_b) - (s - r_a)`` is as large as the logits' spread; ``fl(t - s)`` would
carry ``ulp`` of the offset between the two sides, which the KL does not see and nothing
keeps small (a student 1e5 above its teacher: errors of 1e-2, a negative loss at T = 4). No
``lse = k·M + log2 Z`` is formed: its ``ulp(k·M)`` would not cancel between the two sides
when the KL is small, whereas ``k·X/Z_b`` and ``log2(Z_a/Z_b)`` are each exact to a relative
``2^-24`` of what they are. The row and gradient errors are then those of eager fp32
``log_softmax``/``kl_div``, which take each side's maximum off first too
(``tests/ops/test_kd_loss_values.py`` measures both beside a float64 oracle). The per-lane split
``(v - m)·k + (m - M)·k`` against the backward's ``(v - M)·k`` differs by the same relative
bound, so ``p`` sums to 1 under the forward's ``Z`` to fp32 rounding; the launches pass
``enable_fp_fusion=False`` so that every operation is rounded as written and the two kernels
form their exponents identically.

Why ``(-M_a, -M_b, Z_a, Z_b)`` (the negated maxima are the exponent offsets) suffices for
the backward: ``p_s = 2^((s - M_a)·k)/Z_a`` and ``p_t = 2^((t - M_b)·k)/Z_b``, and
``dL/ds = T·(p_s - p_t)·scale·grad_output``. Storing ``lse`` instead of ``(-M, Z)`` would add
an error of ``ulp(lse)`` to every exponent. The row constant ``c = T·scale·grad_output`` is
folded into ``1/Z`` in fp32, so the gradient is
``2^((s-M_a)·k)·(c/Z_a) - 2^((t-M_b)·k)·(c/Z_b)``, computed in fp32 and rounded ONCE to the
student's dtype. An fp16 gradient is therefore the correctly rounded fp32 value: nothing is
stored unscaled and rescaled later (a stored ``T·(p_s - p_t)`` at V = 131k is mostly
fp16-subnormal and loses its bits before ``grad_output`` could lift it). ``c/Z`` cannot
underflow fp32: ``Z <= V``, ``scale >= 1/(rows·V)``.

-inf logits (matching float64 math). A teacher ``-inf`` has ``p_t = 0`` and contributes
nothing (``0·log 0 = 0``). A student ``-inf`` where the teacher logit is finite (teacher mass,
however small, even one that underflows fp32) makes the row's KL ``+inf``. The cross term never
carries an infinity: it adds its difference where that is finite and 0 where it is not (a
``-inf`` on either side, or NaN: no mass on the teacher's side, or a row that is ``+inf``
anyway), so a zero weight times it is 0, never ``0·inf``; finite differences are never
clamped, so huge finite logits (1e30) keep float64's loss. Each lane records ``max(t - s)``
(maxNum: NaN ignored); it is ``+inf`` when a student ``-inf`` met a finite teacher logit, and
then the row loss is ``+inf`` (or when ``t - s`` overflowed fp32, beyond the limit below).
Limit (both backends): the fp32 sums must not overflow, ``|t - s|·log2(e)/T·V < FLT_MAX``;
beyond it a row may be inf or NaN.
So a later jump of the teacher's maximum, which rescales ``x`` by a factor that may underflow
to 0, cannot produce ``inf·0 = NaN`` (the old kernel did). Running maxima start at ``-FLT_MAX``
(finite), so ``v - m`` is never ``-inf - -inf``. A row whose student (or teacher) is entirely
``-inf`` is undefined (NaN: no finite logit, ``Z = 0``), as is any row holding a NaN (it
reaches ``Z``). Masked rows read nothing and write loss 0 (and a zero gradient row).
Per-element forward cost: two ``exp2`` and about 22 other instructions per student/teacher
pair (sm_90 SASS, counted before the cross term's anchors, which add two compares, two
selects and two subtractions), no barrier; backward: two ``exp2`` and about 10 (the two
exponents are a rounded add and multiply each: see above).

Vectorisation: a row starting at an arbitrary element offset (odd V, shifted views) is split
into a head (< VEC elements up to the first 16-byte boundary of the student row), a body of
full ``BLOCK_V`` blocks loaded without masks from 16-byte-aligned addresses (the compiler is
told so with ``tl.multiple_of``; the launcher proves it, see ``rows.plan_rows``), and a masked
remainder that takes the head and the tail together. The teacher and the gradient use the
aligned body addresses only when their row phase provably equals the student's. The body is
unrolled twice so that two steps' loads are in flight. Block sizes: 2048 lanes at 8 warps is
8 elements (16 bytes of bf16) per thread; the forward's per-lane state (8 fp32 per lane) keeps
it at 108 registers on sm_90 for a bf16 student (``ptxas -v``), two 256-thread programs per SM
(2 x 256 x 108 of the 65,536 registers), with no spills. An fp32 student's forward takes 135
registers, no spills, which leaves room for one program per SM only; whether a smaller block
pays for fp32 is a GPU measurement not yet made.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl
from kasmina.kernels.device import on_device
from kasmina.kernels.rows import (
    kernel_layout_ok,
    plan_rows,
    readable_rows,
    row_vector,
)
from triton.runtime.interpreter import InterpretedFunction

logger = logging.getLogger(__name__)

FWD_BLOCK_V = 2048  # vocabulary chunk per loop step: 8 elements (16 bytes of bf16) per thread
BWD_BLOCK_V = 2048
NUM_WARPS = 8
INTERPRETER_BLOCK_V = 65536  # the interpreter runs a block as one numpy op: fewer, larger steps
LOG2E = 1.4426950408889634
LN2 = math.log(2.0)
LOWEST = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: initial running maximum (finite)
STATS = 4  # per row: -M_a, -M_b, Z_a, Z_b (negated maxima: the exponent offsets)


@triton.jit
def _fold_lanes(m, z, v, k):
    """Fold the logit ``v`` into the per-lane maximum ``m`` and sum ``z`` (raw logits: the
    weights are ``2^((v - m)·k)``); returns the new pair and the weights ``(w_old, w_new)`` with
    ``z' = z·w_old + w_new`` (one exp2 per element). The exponent is ``fl(fl(v - m)·k)``: the
    difference first, so its error is relative to ``|v - m|`` (see the module docstring)."""
    d = v - m
    up = d > 0.0  # False for v = -inf (d = -inf) and NaN
    e = tl.exp2(-tl.abs(d) * k)
    w_old = tl.where(up, e, 1.0)
    w_new = tl.where(up, 1.0, e)
    return tl.where(up, v, m), tl.fma(z, w_old, w_new), w_old, w_new


@triton.jit
def _fwd_step(s, t, k, m_a, z_a, m_b, z_b, x, hi, r_a, r_b):
    s = s.to(tl.float32)  # exact for every input dtype
    t = t.to(tl.float32)
    m_a, z_a, _, _ = _fold_lanes(m_a, z_a, s, k)
    m_b, z_b, w_old, w_new = _fold_lanes(m_b, z_b, t, k)
    # t - s is +inf exactly where the student is -inf under a finite teacher logit (or past
    # fp32): recorded in ``hi`` (maxNum: NaN ignored), it makes the row +inf.
    hi = tl.maximum(hi, t - s, propagate_nan=tl.PropagateNan.NONE)
    # The cross term's difference, each side taken off its own anchor (the lane's first finite
    # logit of that side, NaN until one comes): ``(t - r_b) - (s - r_a)`` is as large as the
    # logits' spread, never their offset, and neither the offset of the two sides (a student
    # 1000 above its teacher) nor their common one rounds into it. A non-finite u (a -inf on
    # either side, or NaN) is replaced by 0: a zero weight times 0 is 0, never 0·inf, and the
    # +inf case is in ``hi``. A finite u is added as it is, however large (no clamp). Cost:
    # two anchor selects, three subtractions, a compare and a select.
    r_a = tl.where((r_a != r_a) & (tl.abs(s) < float("inf")), s, r_a)
    r_b = tl.where((r_b != r_b) & (tl.abs(t) < float("inf")), t, r_b)
    u = (t - r_b) - (s - r_a)
    diff = tl.where(tl.abs(u) < float("inf"), u, 0.0)
    x = tl.fma(w_new, diff, x * w_old)
    return m_a, z_a, m_b, z_b, x, hi, r_a, r_b


@triton.jit
def _max3(a0, b0, c0, a1, b1, c1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1), tl.maximum(c0, c1)


@triton.jit
def _sum3(a0, b0, c0, a1, b1, c1):
    return a0 + a1, b0 + b1, c0 + c1


@triton.jit
def _row_offset(row, R1, off, st0, st1):
    """Element offset of logical row ``row`` in a tensor whose (merged) leading dims are
    ``[rows // R1, R1]`` with strides ``st0, st1`` and whose row 0 starts at ``off``."""
    r0 = row // R1
    return off + r0 * st0 + (row - r0 * R1) * st1


@triton.jit
def _kd_fwd_kernel(
    s_ptr, t_ptr, mask_ptr, loss_ptr, stats_ptr, V, R1,
    s_off, s_st0, s_st1, t_off, t_st0, t_st1, k, loss_factor, params_ptr,
    HAS_MASK: tl.constexpr, WRITE_STATS: tl.constexpr, ALIGN_S: tl.constexpr,
    ALIGN_T: tl.constexpr, VEC: tl.constexpr, BLOCK_V: tl.constexpr, MERGED: tl.constexpr,
    DEVICE_PARAMS: tl.constexpr,
):  # fmt: skip
    """One program per row. ``k = log2(e)/T``, ``loss_factor = T²·ln2`` (with
    ``DEVICE_PARAMS``, loaded from ``params_ptr``). Writes the row loss and, with
    ``WRITE_STATS``, ``(-M_a, -M_b, Z_a, Z_b)``."""
    row = tl.program_id(0).to(tl.int64)
    if DEVICE_PARAMS:
        k = tl.load(params_ptr)
        loss_factor = tl.load(params_ptr + 1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    else:
        keep = True
    if keep:
        o_s = _row_offset(row, R1, s_off, s_st0, s_st1)
        o_t = _row_offset(row, R1, t_off, t_st0, t_st1)
        head = 0
        if ALIGN_S:
            head = tl.minimum((VEC - o_s % VEC) % VEC, V).to(tl.int32)
        n_body = (V - head) // BLOCK_V
        lanes = tl.arange(0, BLOCK_V)
        m_a = tl.full([BLOCK_V], LOWEST, tl.float32)
        z_a = tl.zeros([BLOCK_V], tl.float32)
        m_b = tl.full([BLOCK_V], LOWEST, tl.float32)
        z_b = tl.zeros([BLOCK_V], tl.float32)
        x = tl.zeros([BLOCK_V], tl.float32)
        hi = tl.full([BLOCK_V], float("-inf"), tl.float32)
        r_a = tl.full([BLOCK_V], float("nan"), tl.float32)
        r_b = tl.full([BLOCK_V], float("nan"), tl.float32)
        # Body: full blocks, unmasked; o + head is a multiple of VEC (16 bytes) when aligned.
        if ALIGN_S:
            ps = s_ptr + tl.multiple_of(o_s + head, VEC)
        else:
            ps = s_ptr + (o_s + head)
        if ALIGN_T:
            pt = t_ptr + tl.multiple_of(o_t + head, VEC)
        else:
            pt = t_ptr + (o_t + head)
        for j in tl.range(0, n_body, loop_unroll_factor=2):
            cols = j * BLOCK_V + lanes
            s = tl.load(ps + cols)
            t = tl.load(pt + cols)
            m_a, z_a, m_b, z_b, x, hi, r_a, r_b = _fwd_step(
                s, t, k, m_a, z_a, m_b, z_b, x, hi, r_a, r_b
            )
        # Head [0, head) and tail [head + n_body·BLOCK_V, V), masked, as one index range.
        n_rest = V - n_body * BLOCK_V
        for r in range(0, n_rest, BLOCK_V):
            e = r + lanes
            cols = tl.where(e >= head, e + n_body * BLOCK_V, e)
            inside = e < n_rest
            s = tl.load(s_ptr + o_s + cols, mask=inside, other=float("-inf"))
            t = tl.load(t_ptr + o_t + cols, mask=inside, other=float("-inf"))
            m_a, z_a, m_b, z_b, x, hi, r_a, r_b = _fwd_step(
                s, t, k, m_a, z_a, m_b, z_b, x, hi, r_a, r_b
            )
        # Merge the lanes once per row: two tuple reductions (7 barriers on sm_90). The
        # interpreter runs a tuple reduction element by element in Python, so it takes the
        # equivalent single reductions instead (MERGED is off only there, and in tests).
        if MERGED:
            big_a, big_b, top = tl.reduce((m_a, m_b, hi), 0, _max3)
        else:
            big_a, big_b, top = tl.max(m_a, 0), tl.max(m_b, 0), tl.max(hi, 0)
        w_a = tl.exp2((m_a - big_a) * k)
        w_b = tl.exp2((m_b - big_b) * k)  # 0 for lanes that saw no finite logit
        # Each lane's cross term re-anchored on the row's maxima: + z_b·((r_b - M_b) - (r_a -
        # M_a)), both differences within one side's spread (a lane with no finite logit on a
        # side adds nothing for it).
        shift = (tl.where(r_b == r_b, r_b, big_b) - big_b) - (
            tl.where(r_a == r_a, r_a, big_a) - big_a
        )
        x = tl.fma(z_b, shift, x)
        if MERGED:
            sum_a, sum_b, cross = tl.reduce((z_a * w_a, z_b * w_b, x * w_b), 0, _sum3)
        else:
            sum_a, sum_b, cross = tl.sum(z_a * w_a, 0), tl.sum(z_b * w_b, 0), tl.sum(x * w_b, 0)
        # KL/ln2 = k·X/Z_b + log2(Z_a/Z_b) with X = Σ 2^((t-M_b)·k)·((t - M_b) - (s - M_a)):
        # no lse = k·M + log2 Z is formed, whose rounding (ulp(k·M)) would not cancel. No
        # finite logit on a side: undefined (NaN), as in float64.
        row_kl = (cross / sum_b) * k + tl.log2(sum_a / sum_b)
        loss = tl.where((sum_a > 0.0) & (sum_b > 0.0), loss_factor * row_kl, float("nan"))
        loss = tl.where((top == float("inf")) & (loss == loss), float("inf"), loss)
        tl.store(loss_ptr + row, loss)
        if WRITE_STATS:
            tl.store(stats_ptr + row * 4, -big_a)
            tl.store(stats_ptr + row * 4 + 1, -big_b)
            tl.store(stats_ptr + row * 4 + 2, sum_a)
            tl.store(stats_ptr + row * 4 + 3, sum_b)
    else:
        tl.store(loss_ptr + row, 0.0)


@triton.jit
def _bwd_step(s, t, k, neg_ma, c_a, neg_mb, c_b):
    """``2^((s - M_a)·k)·(c/Z_a) - 2^((t - M_b)·k)·(c/Z_b)``, each exponent the difference
    first, rounded, then scaled, as the forward formed it."""
    p_a = tl.exp2((s.to(tl.float32) + neg_ma) * k)
    p_b = tl.exp2((t.to(tl.float32) + neg_mb) * k)
    return tl.fma(p_a, c_a, -(p_b * c_b))


@triton.jit
def _kd_bwd_kernel(
    s_ptr, t_ptr, g_ptr, mask_ptr, stats_ptr, go_ptr, scale_ptr, V, R1,
    s_off, s_st0, s_st1, t_off, t_st0, t_st1, g_off, g_st0, g_st1, k, c_host, params_ptr,
    HAS_MASK: tl.constexpr, PER_ROW: tl.constexpr, HAS_SCALE: tl.constexpr,
    ALIGN_S: tl.constexpr, ALIGN_T: tl.constexpr, ALIGN_G: tl.constexpr, VEC: tl.constexpr,
    BLOCK_V: tl.constexpr, DEVICE_PARAMS: tl.constexpr,
):  # fmt: skip
    """One program per row: ``g = c·(p_s - p_t)`` with ``c = c_host·grad_output[·scale]``
    (``c_host = T`` times the reduction's host-known factor), all in fp32, one rounding. With
    ``DEVICE_PARAMS``, ``k`` and ``c_host`` are loaded from ``params_ptr``."""
    row = tl.program_id(0).to(tl.int64)
    if DEVICE_PARAMS:
        k = tl.load(params_ptr)
        c_host = tl.load(params_ptr + 1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    else:
        keep = True
    o_g = _row_offset(row, R1, g_off, g_st0, g_st1)
    lanes = tl.arange(0, BLOCK_V)
    if keep:
        if PER_ROW:
            c = tl.load(go_ptr + row).to(tl.float32) * c_host
        else:
            c = tl.load(go_ptr).to(tl.float32) * c_host
        if HAS_SCALE:
            c = c * tl.load(scale_ptr)
        neg_ma = tl.load(stats_ptr + row * 4)
        neg_mb = tl.load(stats_ptr + row * 4 + 1)
        c_a = c / tl.load(stats_ptr + row * 4 + 2)
        c_b = c / tl.load(stats_ptr + row * 4 + 3)
        o_s = _row_offset(row, R1, s_off, s_st0, s_st1)
        o_t = _row_offset(row, R1, t_off, t_st0, t_st1)
        head = 0
        if ALIGN_S:
            head = tl.minimum((VEC - o_s % VEC) % VEC, V).to(tl.int32)
        n_body = (V - head) // BLOCK_V
        if ALIGN_S:
            ps = s_ptr + tl.multiple_of(o_s + head, VEC)
        else:
            ps = s_ptr + (o_s + head)
        if ALIGN_T:
            pt = t_ptr + tl.multiple_of(o_t + head, VEC)
        else:
            pt = t_ptr + (o_t + head)
        if ALIGN_G:
            pg = g_ptr + tl.multiple_of(o_g + head, VEC)
        else:
            pg = g_ptr + (o_g + head)
        for j in tl.range(0, n_body, loop_unroll_factor=2):
            cols = j * BLOCK_V + lanes
            g = _bwd_step(tl.load(ps + cols), tl.load(pt + cols), k, neg_ma, c_a, neg_mb, c_b)
            tl.store(pg + cols, g.to(g_ptr.dtype.element_ty))
        n_rest = V - n_body * BLOCK_V
        for r in range(0, n_rest, BLOCK_V):
            e = r + lanes
            cols = tl.where(e >= head, e + n_body * BLOCK_V, e)
            inside = e < n_rest
            s = tl.load(s_ptr + o_s + cols, mask=inside, other=0.0)
            t = tl.load(t_ptr + o_t + cols, mask=inside, other=0.0)
            g = _bwd_step(s, t, k, neg_ma, c_a, neg_mb, c_b)
            tl.store(g_ptr + o_g + cols, g.to(g_ptr.dtype.element_ty), mask=inside)
    else:
        zero = tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty)
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            tl.store(g_ptr + o_g + cols, zero, mask=cols < V)


# --------------------------------------------------------------------------- layouts


def interpreting() -> bool:
    """Whether these kernels run in Triton's interpreter: decided by how this module's
    ``@triton.jit`` was built (TRITON_INTERPRET when triton was imported), not by the variable
    now, so a launch recorded for offline compilation gets the GPU configuration."""
    return isinstance(_kd_fwd_kernel, InterpretedFunction)


def default_block_v(vocab: int, block: int = FWD_BLOCK_V) -> int:
    cap = INTERPRETER_BLOCK_V if interpreting() else block
    return min(cap, triton.next_power_of_2(max(vocab, 16)))


# --------------------------------------------------------------------------- launchers

# The op's reduction names and host scale (kasmina.ops.kd_loss: REDUCTIONS, _host_scale), kept
# here too: this package imports nothing of kasmina, the op's CPU path must not load Triton, and
# a launcher called directly validates and scales on its own. tests/ops/test_kd_loss_kernels.py
# pins the two equal.
REDUCTIONS = ("none", "sum", "mean", "batchmean")


def host_scale(reduction: str, rows: int, vocab: int, masked: bool) -> float:
    """The part of the reduction's scale known on the host: ``1/(rows·V)`` (mean) or ``1/rows``
    (batchmean) without a mask; with a mask only ``1/V`` (mean), the ``1/rows_kept`` being
    ``kd_forward``'s device-side scale."""
    factor = 1.0 / vocab if reduction == "mean" else 1.0
    if reduction in ("mean", "batchmean") and not masked:
        factor /= max(rows, 1)
    return factor


def _check_buffer(
    name: str, t: torch.Tensor, shape: tuple[int, ...], ref: torch.Tensor, dtype: torch.dtype
) -> None:
    if tuple(t.shape) != shape or t.device != ref.device or t.dtype != dtype:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {shape} on {ref.device}, got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )


def _check_logits(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> None:
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last dim, got shape {tuple(student.shape)}")
    _check_buffer("teacher", teacher, tuple(student.shape), student, teacher.dtype)
    if mask is not None:
        _check_buffer("mask", mask, tuple(student.shape[:-1]), student, torch.bool)


def _params(
    temperature: float | torch.Tensor, log2e: float, factor: float | torch.Tensor
) -> tuple[float, float, torch.Tensor | None]:
    """``(k, factor, None)`` for a float temperature (kernel arguments, as ever); for a 0-d
    float64 device tensor (``torch.compile`` passes one: a float argument would be guarded by
    value), ``(0, 0, params)`` with ``params = [k, factor]`` in fp32 on the device, rounded
    from float64 as the host rounds a float argument: the same kernel values, and no host
    read (no sync)."""
    if not isinstance(temperature, torch.Tensor):
        return log2e / temperature, float(factor), None
    return 0.0, 0.0, torch.stack((log2e / temperature, factor)).to(torch.float32)


def kd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float | torch.Tensor,
    reduction: str,
    need_grad: bool,
    *,
    loss_rows_out: torch.Tensor | None = None,
    stats_out: torch.Tensor | None = None,
    block_v: int | None = None,
    merged: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, stats, scale)`` for logits ``[..., V]`` (strided rows are read in place).

    ``loss`` is fp32: 0-d, or per row for ``"none"``. With ``need_grad``, ``stats`` is the fp32
    ``[..., 4]`` ``(-M_a, -M_b, Z_a, Z_b)`` per row that ``kd_backward`` needs, and ``scale`` is the
    0-d fp32 device tensor ``1/max(rows_kept, 1)`` when a mask meets ``mean``/``batchmean``
    (computed on the device: no host sync); otherwise each is empty. Masked rows' stats are
    not written. ``loss_rows_out`` (fp32 ``[rows]``) and ``stats_out`` may be preallocated;
    ``block_v`` and ``merged`` (tuple reductions; off by default only in the interpreter) are
    for tests.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_logits(student, teacher, mask)
    vocab = student.shape[-1]
    lead = tuple(student.shape[:-1])
    rows = math.prod(lead)
    f32 = torch.float32
    per_row = None  # "none" returns it: a tensor of its own, not a view (an in-place op works)
    if loss_rows_out is None:
        per_row = torch.empty(lead, device=student.device, dtype=f32)
        loss_rows_out = per_row.view(rows)
    _check_buffer("loss_rows_out", loss_rows_out, (rows,), student, f32)
    if not loss_rows_out.is_contiguous():
        raise ValueError("loss_rows_out must be contiguous")
    stats_shape = (*lead, STATS) if need_grad else (0,)
    if stats_out is None:
        stats_out = torch.empty(stats_shape, device=student.device, dtype=f32)
    _check_buffer("stats_out", stats_out, stats_shape, student, f32)
    if not stats_out.is_contiguous():
        raise ValueError("stats_out must be contiguous")
    flat_mask = None if mask is None else row_vector(mask)

    kept: torch.Tensor | None = None
    if flat_mask is not None and reduction in ("mean", "batchmean"):
        kept = flat_mask.sum(dtype=f32).clamp_(min=1.0)
    scale = student.new_empty(0, dtype=f32)
    if need_grad and kept is not None:
        scale = kept.reciprocal()
    if rows:
        s, t = readable_rows(student, teacher)
        plan = plan_rows([s, t])
        assert plan is not None  # readable_rows guarantees a two-dim row layout
        ((s_b, s_off, s_st0, s_st1), (t_b, t_off, t_st0, t_st1)), r1, vec, aligned = plan
        k, factor, params = _params(temperature, LOG2E, temperature * temperature * LN2)
        with on_device(student.device):
            _kd_fwd_kernel[(rows,)](
                s_b, t_b, s_b if flat_mask is None else flat_mask, loss_rows_out,
                stats_out if need_grad else loss_rows_out, vocab, r1,
                s_off, s_st0, s_st1, t_off, t_st0, t_st1, k, factor,
                s_b if params is None else params, DEVICE_PARAMS=params is not None,
                HAS_MASK=flat_mask is not None, WRITE_STATS=need_grad, ALIGN_S=aligned[0],
                ALIGN_T=aligned[1], VEC=vec, BLOCK_V=block_v or default_block_v(vocab),
                MERGED=not interpreting() if merged is None else merged, num_warps=NUM_WARPS,
                enable_fp_fusion=False,  # the exponents' roundings are the backward's (above)
            )  # fmt: skip
    if reduction == "none":
        return loss_rows_out.view(lead) if per_row is None else per_row, stats_out, scale
    total = loss_rows_out.sum()
    if reduction == "sum":
        return total, stats_out, scale
    total = total * host_scale(reduction, rows, vocab, kept is not None)
    return (total if kept is None else total / kept), stats_out, scale


def kd_backward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    stats: torch.Tensor,
    scale: torch.Tensor | None,
    grad_output: torch.Tensor,
    temperature: float | torch.Tensor,
    reduction: str,
    *,
    out: torch.Tensor | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """The student gradient ``T·(p_s - p_t)·scale·grad_output``, computed in fp32 from the
    logits and ``kd_forward``'s ``stats``/``scale``, rounded once to the student's dtype.

    ``grad_output`` is 0-d, or has the loss's per-row shape for ``"none"`` (any strides, an
    expanded one too: see ``row_vector``). ``out`` (the
    student's shape and dtype, any strides the kernel can address) is written when given, else
    a contiguous tensor. A gradient laid out like a strided student (``kasmina.ops`` does that)
    shares the student rows' 16-byte phase, so its stores stay vectorised for odd V.
    """
    _check_logits(student, teacher, mask)
    vocab = student.shape[-1]
    lead = tuple(student.shape[:-1])
    rows = math.prod(lead)
    f32 = torch.float32
    _check_buffer("stats", stats, (*lead, STATS), student, f32)
    if not stats.is_contiguous():
        raise ValueError("stats must be contiguous")
    per_row = reduction == "none"
    if per_row:
        if tuple(grad_output.shape) != lead:
            raise ValueError(f"grad_output must have shape {lead}, got {tuple(grad_output.shape)}")
        grad_output = row_vector(grad_output)
    elif grad_output.numel() != 1:
        raise ValueError(f"grad_output must be a scalar, got shape {tuple(grad_output.shape)}")
    if grad_output.device != student.device:
        raise ValueError(f"grad_output is on {grad_output.device}, expected {student.device}")
    has_scale = scale is not None and scale.numel() > 0
    if has_scale:
        _check_buffer("scale", scale, (), student, f32)
    if out is None:
        out = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    _check_buffer("out", out, tuple(student.shape), student, student.dtype)
    if not rows:
        return out
    s, t = readable_rows(student, teacher)
    plan = plan_rows([s, t, out])
    if plan is None or not kernel_layout_ok(out):
        raise ValueError(f"out has strides {out.stride()} that the kernel cannot address")
    (sa, ta, ga), r1, vec, aligned = plan
    if not aligned[2]:
        # Stores are layout anchors: an unaligned gradient is stored one element per thread,
        # and vector loads would then cost a shared-memory layout conversion (two barriers)
        # per step. Scalar loads keep the whole loop in one layout.
        aligned = [False, False, False]
    c_host = temperature * host_scale(reduction, rows, vocab, mask is not None)
    k, c_host, params = _params(temperature, LOG2E, c_host)
    with on_device(student.device):
        _kd_bwd_kernel[(rows,)](
            sa[0], ta[0], ga[0], sa[0] if mask is None else row_vector(mask), stats, grad_output,
            scale if has_scale else stats, vocab, r1, *sa[1:], *ta[1:], *ga[1:],
            k, c_host, stats if params is None else params, DEVICE_PARAMS=params is not None,
            HAS_MASK=mask is not None, PER_ROW=per_row, HAS_SCALE=has_scale, ALIGN_S=aligned[0],
            ALIGN_T=aligned[1], ALIGN_G=aligned[2], VEC=vec,
            BLOCK_V=block_v or default_block_v(vocab, BWD_BLOCK_V), num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # the forward's exponents exactly (see the module docstring)
        )  # fmt: skip
    return out
