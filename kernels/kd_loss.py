"""Triton kernels for ``kd_kl_loss``: per-row ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` and its
student gradient, with a streaming softmax over the vocabulary.

One program per row loops over ``V`` in ``BLOCK_V`` chunks, so any ``V`` (262,144 and beyond)
works with bounded registers and no ``[rows, V]`` probability tensor is ever written.

Pass 1 keeps, in base 2 (``a = s·log2(e)/T``, ``b = t·log2(e)/T``, so ``exp2`` is one
instruction), the running maxima ``m_a, m_b``, the sums ``z_a = Σ 2^(a-m_a)``,
``z_b = Σ 2^(b-m_b)`` and the cross term ``x = Σ 2^(b-m_b)·(b-a)``, rescaling them whenever a
maximum grows. Then, with ``lse = m + log2 z``::

    row_loss = T² · ln2 · (x / z_b - lse_b + lse_a)

because ``KL = Σ p_t (log p_t - log p_s) = ln2 · (Σ p_t (b - a) - lse_b + lse_a)``.
Pass 2 (only when the student needs a gradient) rereads the row and writes the UNSCALED
``T · (p_s - p_t)`` in the gradient buffer's dtype: it is bounded by ``T``, so it is safe in
fp16/bf16. The reduction's scale (``1/rows_kept`` or ``1/(rows_kept·V)``) is NOT folded in: in
fp16 ``T·(p_s - p_t)/(rows·V)`` underflows to 0 before a loss-scaled ``grad_output`` (65536 from
a GradScaler) could lift it. ``kd_forward`` returns that scale as a 0-d fp32 device tensor
instead (computed from the mask on the device, so nothing syncs with the host), and the
backward applies ``scale · grad_output`` in fp32.

-inf logits: teacher ``-inf`` entries have ``p_t = 0`` and contribute nothing (``0·log 0 = 0``);
a student ``-inf`` where the teacher has mass gives ``+inf``; a fully ``-inf`` row is undefined
(NaN), as is any row holding a NaN. Masked rows read nothing and write loss 0, gradient 0.

The backward kernel scales the stored gradient by ``grad_output`` (a scalar, or one value per
row for ``reduction="none"``) times the optional reduction scale, in fp32, into ``out`` (which
may be the stored buffer itself).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

BLOCK_V = 4096  # vocabulary chunk per loop step on a GPU (16 elements per thread at 8 warps)
INTERPRETER_BLOCK_V = 65536  # the interpreter runs a block as one numpy op: fewer, larger steps
NUM_WARPS = 8
LOG2E = 1.4426950408889634
LN2 = math.log(2.0)


@triton.jit
def _kd_fwd_kernel(
    s_ptr, t_ptr, mask_ptr, loss_ptr, grad_ptr, V, k, loss_factor, grad_factor,
    HAS_MASK: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """``k = log2(e)/T``; ``loss_factor = T²·ln2``; ``grad_factor = T`` (no reduction scale)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * V
    if HAS_MASK:
        keep = tl.load(mask_ptr + row) != 0
    else:
        keep = True
    if keep:
        m_a = float("-inf")
        m_b = float("-inf")
        z_a = 0.0
        z_b = 0.0
        x = 0.0
        for off in range(0, V, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            inside = cols < V
            a = tl.load(s_ptr + base + cols, mask=inside, other=float("-inf")).to(tl.float32) * k
            b = tl.load(t_ptr + base + cols, mask=inside, other=float("-inf")).to(tl.float32) * k
            new_a = tl.maximum(m_a, tl.max(a, axis=0))
            new_b = tl.maximum(m_b, tl.max(b, axis=0))
            # Reference points: 0 while a maximum is still -inf, so -inf - -inf never appears.
            ref_a = tl.where(new_a == float("-inf"), 0.0, new_a)
            ref_b = tl.where(new_b == float("-inf"), 0.0, new_b)
            e_b = tl.exp2(b - ref_b)
            rescale_b = tl.exp2(m_b - ref_b)
            z_a = z_a * tl.exp2(m_a - ref_a) + tl.sum(tl.exp2(a - ref_a), axis=0)
            z_b = z_b * rescale_b + tl.sum(e_b, axis=0)
            # p_t = 0 terms are 0 (0·log 0); selecting both operands avoids -inf - -inf.
            has_t = e_b > 0
            diff = tl.where(has_t, b, 0.0) - tl.where(has_t, a, 0.0)
            x = x * rescale_b + tl.sum(e_b * diff, axis=0)
            m_a = new_a
            m_b = new_b
        lse_a = m_a + tl.log2(z_a)
        lse_b = m_b + tl.log2(z_b)
        tl.store(loss_ptr + row, loss_factor * (x / z_b - lse_b + lse_a))
        if NEED_GRAD:
            inv_a = grad_factor / z_a  # folds T into the normalisers
            inv_b = grad_factor / z_b
            for off in range(0, V, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                inside = cols < V
                a = tl.load(s_ptr + base + cols, mask=inside, other=0.0).to(tl.float32) * k
                b = tl.load(t_ptr + base + cols, mask=inside, other=0.0).to(tl.float32) * k
                g = tl.exp2(a - m_a) * inv_a - tl.exp2(b - m_b) * inv_b
                tl.store(grad_ptr + base + cols, g.to(grad_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(loss_ptr + row, 0.0)
        if NEED_GRAD:
            zero = tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty)
            for off in range(0, V, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                tl.store(grad_ptr + base + cols, zero, mask=cols < V)


@triton.jit
def _kd_scale_kernel(
    g_ptr, go_ptr, scale_ptr, out_ptr, V,
    PER_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """``out[row, cols] = g[row, cols] * go * scale`` in fp32 (``go[row]`` when ``PER_ROW``;
    ``scale`` a 0-d fp32 tensor, 1 without ``HAS_SCALE``).

    Grid: (rows, cdiv(V, BLOCK_V))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = cols < V
    if PER_ROW:
        go = tl.load(go_ptr + row).to(tl.float32)
    else:
        go = tl.load(go_ptr).to(tl.float32)
    if HAS_SCALE:
        go = go * tl.load(scale_ptr).to(tl.float32)
    offs = row * V + cols
    g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=inside)


# --------------------------------------------------------------------------- launchers


def default_block_v(vocab: int) -> int:
    cap = INTERPRETER_BLOCK_V if os.environ.get("TRITON_INTERPRET") == "1" else BLOCK_V
    return min(cap, triton.next_power_of_2(max(vocab, 16)))


def _check_buffer(name: str, t: torch.Tensor, shape: tuple[int, ...], ref: torch.Tensor) -> None:
    if tuple(t.shape) != shape or t.device != ref.device or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous tensor of shape {shape} on {ref.device}, got "
            f"{tuple(t.shape)} on {t.device}"
        )


def kd_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    reduction: str,
    need_grad: bool,
    *,
    grad_out: torch.Tensor | None = None,
    loss_rows_out: torch.Tensor | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, unscaled student gradient, gradient scale)`` for contiguous logits ``[..., V]``.

    ``loss`` is fp32 (0-d, or per row for ``"none"``); the gradient ``T·(p_s - p_t)`` has the
    student's dtype and shape (empty when ``need_grad`` is off) and does NOT include the
    reduction's scale: that is the third result, a 0-d fp32 device tensor (``1/rows_kept`` or
    ``1/(rows_kept·V)``) for ``mean``/``batchmean`` with ``need_grad``, else empty (scale 1).
    The gradient of the loss is ``gradient · scale · grad_output`` (see ``kd_backward``).
    ``grad_out`` / ``loss_rows_out`` (fp32 ``[rows]``) may be passed preallocated.
    """
    vocab = student.shape[-1]
    rows = student.numel() // vocab
    lead = tuple(student.shape[:-1])
    for name, t in (("student", student), ("teacher", teacher)):
        _check_buffer(name, t, tuple(student.shape), student)
    if mask is not None:
        _check_buffer("mask", mask, lead, student)
    if loss_rows_out is None:
        loss_rows_out = torch.empty(rows, device=student.device, dtype=torch.float32)
    _check_buffer("loss_rows_out", loss_rows_out, (rows,), student)
    if need_grad:
        if grad_out is None:
            grad_out = torch.empty_like(student)
        _check_buffer("grad_out", grad_out, tuple(student.shape), student)
        grad = grad_out
    else:
        grad = student.new_empty(0)

    # What mean / batchmean divide by: on the host without a mask, a 0-d device tensor with one.
    denom: torch.Tensor | float = 1.0
    if reduction in ("mean", "batchmean"):
        if mask is None:
            denom = float(max(rows, 1) * (vocab if reduction == "mean" else 1))
        else:
            denom = mask.sum(dtype=torch.float32).clamp_(min=1.0)
            if reduction == "mean":
                denom = denom.mul_(vocab)
    scale = student.new_empty(0, dtype=torch.float32)
    if need_grad and reduction in ("mean", "batchmean"):
        if isinstance(denom, torch.Tensor):
            scale = denom.reciprocal()
        else:  # a device-side fill, not a host-to-device copy (which would sync)
            scale = torch.full((), 1.0 / denom, dtype=torch.float32, device=student.device)
    if rows:
        _kd_fwd_kernel[(rows,)](
            student, teacher, student if mask is None else mask, loss_rows_out,
            grad if need_grad else student, vocab, LOG2E / temperature,
            temperature * temperature * LN2, temperature,
            HAS_MASK=mask is not None, NEED_GRAD=need_grad,
            BLOCK_V=block_v or default_block_v(vocab), num_warps=NUM_WARPS,
        )  # fmt: skip
    if reduction == "none":
        return loss_rows_out.view(lead), grad, scale
    total = loss_rows_out.sum()
    return (total if reduction == "sum" else total / denom), grad, scale


def kd_backward(
    stored_grad: torch.Tensor,
    grad_output: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``stored_grad * grad_output * scale`` in fp32, rounded to ``stored_grad``'s dtype.

    ``grad_output`` is 0-d, or has ``stored_grad.shape[:-1]`` (one value per row); ``scale`` is
    a 0-d fp32 tensor (``kd_forward``'s third result), or None / empty for 1. ``out`` may be
    ``stored_grad`` itself (each element is read before it is written).
    """
    vocab = stored_grad.shape[-1]
    rows = stored_grad.numel() // vocab if vocab else 0
    per_row = grad_output.dim() > 0
    _check_buffer("stored_grad", stored_grad, tuple(stored_grad.shape), stored_grad)
    expected = tuple(stored_grad.shape[:-1]) if per_row else ()
    _check_buffer("grad_output", grad_output, expected, stored_grad)
    has_scale = scale is not None and scale.numel() > 0
    if has_scale:
        _check_buffer("scale", scale, (), stored_grad)
    if out is None:
        out = torch.empty_like(stored_grad)
    _check_buffer("out", out, tuple(stored_grad.shape), stored_grad)
    if rows:
        block = default_block_v(vocab)
        _kd_scale_kernel[(rows, triton.cdiv(vocab, block))](
            stored_grad, grad_output, scale if has_scale else grad_output, out, vocab,
            PER_ROW=per_row, HAS_SCALE=has_scale, BLOCK_V=block, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out
