"""``kd_kl_loss``: knowledge-distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

Rows are all leading dims of the logits (the loss of ``F.kl_div`` on ``x.view(-1, V)``); the
sum runs over the last dim ``V``. Reductions follow ``F.kl_div``: ``none`` (per-row loss, shape
``logits.shape[:-1]``), ``sum``, ``mean`` (sum / (rows_kept·V)) and ``batchmean``
(sum / rows_kept). ``mask`` (bool, shape ``logits.shape[:-1]``) drops rows: they contribute 0 to
the loss and get a 0 gradient, and ``rows_kept`` counts only kept rows; if no row is kept,
``mean``/``batchmean`` return 0 rather than 0/0.

The student gradient is computed in the forward pass (Triton: one streaming-softmax pass over
``V`` for the loss, one more to write the gradient) and stored, in the student's dtype, as the
only logits-sized buffer: no ``[rows, V]`` probability tensor is materialised. What is stored
is the UNSCALED ``T·(p_s - p_t)`` (bounded by ``T``); the reduction's ``1/rows_kept`` or
``1/(rows_kept·V)`` is kept aside as a 0-d fp32 device tensor and meets ``grad_output`` in fp32
in the backward. Folding it in first would underflow fp16 (``1/(rows·V)`` times a probability
difference is far below fp16's smallest subnormal) before a loss-scaled ``grad_output`` (65536
from a GradScaler) could lift it, zeroing the gradient. The eager backward scales that buffer
by ``scale·grad_output`` in place and returns it, so forward+backward never holds a second
logits-sized buffer; when the graph is kept (``retain_graph`` or ``create_graph``) it writes a
fresh tensor instead and leaves the saved one intact, so a second backward stays correct. (The
custom op used under ``torch.compile`` is functional and always writes a fresh tensor.) When
the student does not require grad (or grad mode is off) the gradient is not computed at all.
The teacher never gets a gradient.

CUDA tensors run ``kasmina.kernels.kd_loss``; CPU tensors run the torch code below. Under
``torch.compile`` the op is a ``torch.library.custom_op`` (no graph break, forward and backward);
eager calls use an equivalent, cheaper ``torch.autograd.Function``.

The loss is returned in float32 (it is accumulated in fp32; rounding a scalar to bf16 would only
lose digits). Student and teacher may have different float dtypes (e.g. a bf16 teacher).
Non-contiguous logits are made contiguous (a copy); ``temperature`` must be a float > 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kasmina.ops.backend import check_float_tensor, use_triton

__all__ = ["kd_kl_loss", "kd_kl_loss_reference"]

REDUCTIONS = ("none", "sum", "mean", "batchmean")


# --------------------------------------------------------------------------- reference


def _denominator(reduction: str, kept: Tensor | int, vocab: int) -> Tensor | int:
    """What ``mean``/``batchmean`` divide by; at least 1 so an all-masked batch gives 0."""
    rows = kept.clamp(min=1) if isinstance(kept, Tensor) else max(kept, 1)
    return rows * vocab if reduction == "mean" else rows


def _reduce(rows: Tensor, reduction: str, kept: Tensor | int, vocab: int) -> Tensor:
    """Apply ``reduction`` to per-row losses; ``kept`` is the number of rows kept by the mask."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / _denominator(reduction, kept, vocab)


def kd_kl_loss_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """Plain-torch ``kd_kl_loss``: the test oracle (differentiable by autograd).

    Computes in at least fp32 and returns that dtype; materialises the probabilities (clarity
    first). ``0 · log 0`` terms (teacher probability exactly 0) count as 0, as in ``F.kl_div``;
    NaN propagates.
    """
    t_ = temperature
    work = torch.promote_types(student_logits.dtype, torch.float32)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    s = student_logits.to(work).reshape(-1, vocab)
    t = teacher_logits.detach().to(work).reshape(-1, vocab)
    keep = None if mask is None else mask.reshape(-1)
    if keep is not None:
        s, t = s[keep], t[keep]
    log_ps = torch.log_softmax(s / t_, dim=-1)
    log_pt = torch.log_softmax(t / t_, dim=-1)
    p_t = log_pt.exp()
    kl = torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (log_pt - log_ps)).sum(-1)
    rows = kl * (t_ * t_)
    if keep is not None:
        rows = torch.zeros(keep.shape, dtype=work, device=s.device).index_put((keep,), rows)
    kept = int(keep.sum()) if keep is not None else rows.numel()
    return _reduce(rows.reshape(lead), reduction, kept, vocab)


def _kd_forward_reference(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    temperature: float,
    reduction: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """CPU path of the op: ``(loss, stored student gradient, gradient scale)`` with the explicit
    formulas ``row = T²·Σ p_t (log p_t - log p_s)`` and ``dL/ds = T·(p_s - p_t)·scale``; the
    stored gradient is the unscaled ``T·(p_s - p_t)`` and ``scale`` a 0-d fp32 tensor for
    ``mean``/``batchmean`` (empty, meaning 1, otherwise), as ``kernels.kd_forward`` returns."""
    t_ = temperature
    vocab = student.shape[-1]
    log_ps = torch.log_softmax(student.float().reshape(-1, vocab) / t_, dim=-1)
    log_pt = torch.log_softmax(teacher.float().reshape(-1, vocab) / t_, dim=-1)
    p_t = log_pt.exp()
    rows = torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (log_pt - log_ps)).sum(-1) * t_**2
    keep = None if mask is None else mask.reshape(-1)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    kept: Tensor | int = keep.sum() if keep is not None else rows.numel()
    loss = _reduce(rows.reshape(student.shape[:-1]), reduction, kept, vocab)
    no_scale = student.new_empty(0, dtype=torch.float32)
    if not need_grad:
        return loss, student.new_empty(0), no_scale
    grad = (log_ps.exp() - p_t) * t_
    if keep is not None:
        grad = torch.where(keep[:, None], grad, torch.zeros_like(grad))
    scale = no_scale
    if reduction in ("mean", "batchmean"):
        denom = _denominator(reduction, kept, vocab)
        if isinstance(denom, Tensor):  # from the mask, on the device: no host sync
            scale = denom.to(torch.float32).reciprocal()
        else:
            scale = torch.full((), 1.0 / denom, dtype=torch.float32, device=student.device)
    return loss, grad.to(student.dtype).reshape(student.shape), scale


def _scale_grad_reference(
    stored: Tensor, grad_output: Tensor, scale: Tensor | None, out: Tensor | None = None
) -> Tensor:
    go = grad_output.float()
    if scale is not None and scale.numel():
        go = go * scale
    if go.dim() > 0:
        go = go.unsqueeze(-1)
    scaled = (stored.float() * go).to(stored.dtype)
    return scaled if out is None else out.copy_(scaled)


# --------------------------------------------------------------------------- autograd wiring
# One pair of implementations (dispatching Triton vs reference), two wrappers: eager calls go
# through a torch.autograd.Function (cheap per call), torch.compile sees the custom ops (opaque
# nodes, no graph break), whose eager dispatcher round trip would cost several times more.


def _kernels():
    from kasmina.kernels import kd_loss as kernels  # lazy: triton only when used

    return kernels


def _forward_impl(
    student: Tensor, teacher: Tensor, mask: Tensor | None, temperature: float, reduction: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(loss, unscaled stored student gradient, gradient scale)``; the gradient is empty when
    ``need_grad`` is off, the scale (0-d fp32) is empty when it is 1."""
    if use_triton(student.device):
        return _kernels().kd_forward(student, teacher, mask, temperature, reduction, need_grad)
    return _kd_forward_reference(student, teacher, mask, temperature, reduction, need_grad)


def _backward_impl(
    stored_grad: Tensor, grad_output: Tensor, scale: Tensor | None, out: Tensor | None = None
) -> Tensor:
    """``stored_grad * grad_output * scale`` in fp32 (``grad_output`` a 0-d scalar, or one value
    per row for ``none``; ``scale`` 0-d, or None/empty for 1), written to ``out`` when given
    (``out`` may be ``stored_grad`` itself)."""
    grad_output = grad_output.contiguous()
    if use_triton(stored_grad.device):
        return _kernels().kd_backward(stored_grad, grad_output, scale, out=out)
    return _scale_grad_reference(stored_grad, grad_output, scale, out)


def _graph_is_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph``/``create_graph``); True
    when that cannot be told, which only costs the in-place saving."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


class _KDFunction(torch.autograd.Function):
    """Eager path."""

    @staticmethod
    def forward(ctx, student, teacher, mask, temperature, reduction, need_grad):  # type: ignore[override]
        loss, grad, scale = _forward_impl(student, teacher, mask, temperature, reduction, need_grad)
        ctx.save_for_backward(grad, scale)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        stored, scale = ctx.saved_tensors
        # Not kept: autograd frees the saved buffer after this call, so it can become the
        # gradient itself instead of a second logits-sized allocation.
        out = None if _graph_is_kept() else stored
        return _backward_impl(stored, grad_loss, scale, out), None, None, None, None, None


@torch.library.custom_op("kasmina::kd_kl_loss", mutates_args=())
def _kd_op(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    temperature: float,
    reduction: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(student, teacher, mask, temperature, reduction, need_grad)


@_kd_op.register_fake
def _kd_fake(student, teacher, mask, temperature, reduction, need_grad):
    shape = student.shape[:-1] if reduction == "none" else ()
    loss = student.new_empty(shape, dtype=torch.float32)
    grad = torch.empty_like(student) if need_grad else student.new_empty(0)
    scaled = need_grad and reduction in ("mean", "batchmean")
    scale = student.new_empty(() if scaled else (0,), dtype=torch.float32)
    return loss, grad, scale


@torch.library.custom_op("kasmina::kd_kl_loss_backward", mutates_args=())
def _kd_backward_op(stored_grad: Tensor, grad_output: Tensor, scale: Tensor) -> Tensor:
    return _backward_impl(stored_grad, grad_output, scale)


@_kd_backward_op.register_fake
def _kd_backward_fake(stored_grad, grad_output, scale):
    return torch.empty_like(stored_grad)


def _setup_context(ctx, inputs, output) -> None:
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # the stored-gradient and scale outputs get no gradient
    ctx.save_for_backward(output[1], output[2])


def _op_backward(ctx, grad_loss: Tensor | None, _grad_stored: Tensor | None, _grad_scale=None):
    stored, scale = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None
    grad = torch.ops.kasmina.kd_kl_loss_backward(stored, grad_loss, scale)
    return grad, None, None, None, None, None


_kd_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry


def _check(student: Tensor, teacher: Tensor, temperature: object, reduction: str, mask) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    check_float_tensor("student_logits", student)
    check_float_tensor("teacher_logits", teacher, student.device)
    if student.dim() == 0 or student.shape[-1] == 0:
        raise ValueError(f"logits need a non-empty last dim, got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} "
            "must have the same shape"
        )
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor")
        if mask.device != student.device:
            raise ValueError(f"mask is on {mask.device}, expected {student.device}")
        if mask.shape != student.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the logits' leading dims "
                f"{tuple(student.shape[:-1])}"
            )


def kd_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """``T²·KL(softmax(teacher/T) ‖ softmax(student/T))`` over the last dim, reduced.

    See the module docstring for reductions, masking, dtypes and memory behaviour. Returns a
    float32 tensor: 0-d, or ``student_logits.shape[:-1]`` for ``reduction="none"``.
    """
    _check(student_logits, teacher_logits, temperature, reduction, mask)
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    args = (
        student_logits.contiguous(),
        teacher_logits.detach().contiguous(),
        None if mask is None else mask.contiguous(),
        float(temperature),
        reduction,
        need_grad,
    )
    if torch.compiler.is_compiling():
        return _kd_op(*args)[0]
    return _KDFunction.apply(*args)
