"""``kd_kl_loss``: knowledge-distillation loss ``T² · KL(softmax(t/T) ‖ softmax(s/T))``.

Rows are all leading dims of the logits (the loss of ``F.kl_div`` on ``x.view(-1, V)``); the
sum runs over the last dim ``V``. Reductions follow ``F.kl_div``: ``none`` (per-row loss, shape
``logits.shape[:-1]``), ``sum``, ``mean`` (sum / (rows_kept·V)) and ``batchmean``
(sum / rows_kept). ``mask`` (bool, shape ``logits.shape[:-1]``) drops rows: they contribute 0 to
the loss and get a 0 gradient, and ``rows_kept`` counts only kept rows; if no row is kept,
``mean``/``batchmean`` return 0 rather than 0/0.

Forward and backward (docs/design.md §2). The forward reads both logits once and keeps only
per-row statistics, ``(-M_a, -M_b, Z_a, Z_b)`` in base 2 (``k = log2(e)/T``, ``M`` the row's
maximum logit, ``Z = Σ 2^((x-M)·k)``), fp32 ``[..., 4]`` (four numbers per logits row), plus,
when a mask meets ``mean``/``batchmean``, the 0-d device scale ``1/rows_kept``. The backward
reads both logits again and writes the gradient ``T·(p_s - p_t)·scale·grad_output`` once,
computed in fp32 and rounded once to the student's dtype. On a GPU that is 5 logits-sized passes
in all, and the gradient is the only logits-sized buffer the op ever allocates, eager and under
``torch.compile``. Strided logits such as ``logits[:, :-1]`` are read in place through their row
strides (at most two leading dims after merging, unit stride in the last dim; anything else is
copied), and the gradient takes the student's strides when they are compact (see
``kd_layout.grad_strides``). When the student does not require grad (or grad mode is off) no
statistics are kept. The teacher never gets a gradient.

-inf logits follow float64 math: a teacher ``-inf`` contributes nothing (``0·log 0 = 0``); a
student ``-inf`` where the teacher logit is finite makes that row's loss ``+inf`` (never NaN);
a row whose student or teacher is all ``-inf`` is undefined (NaN), as is any row with a NaN.

CUDA tensors run ``kasmina.kernels.kd_loss``; CPU tensors run ``kd_forward_reference`` /
``kd_backward_reference`` below, the same algorithm in torch ops (the CPU path). Eager autograd
on a CPU runs ``kd_forward_grad_reference`` / ``kd_scale_grad_reference`` instead: the forward
also forms the unscaled fp32 gradient from the exponentials it computed anyway and keeps it for
the backward (one scaling pass), fewer passes for one fp32 logits-sized tensor held. Under
``torch.compile`` the op is a ``torch.library.custom_op`` (no graph break, forward and
backward); eager calls use an equivalent, cheaper ``torch.autograd.Function``; both call the
same two implementations.

The loss is returned in float32 (it is accumulated in fp32; rounding a scalar to bf16 would only
lose digits). Student and teacher may have different float dtypes (e.g. a bf16 teacher);
``temperature`` must be a real number in [1e-18, 1e4] (``check_temperature``). Under
``torch.compile`` it is a 0-d float64 tensor input of the custom op (a float argument would be
guarded by value: a temperature schedule would recompile each call); eager calls keep the float.

The backward is once-differentiable (``first_order_backward``): under ``create_graph=True`` its
first-order gradients are exact, and a second backward through them (a gradient penalty)
raises PyTorch's "trying to differentiate twice" error rather than miss the softmax's
second-order term; the compiled path's backward op has no autograd formula and raises too.
Forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``) runs the eager
Function's rule, the backward's transpose in torch ops (``kd_tangent``), on both backends; the
compiled path's custom op has none. One level deep: its ``p_s - p_t`` records no graph, so nested
forward mode, ``grad`` beside ``jvp`` and a backward through a tangent raise naming the op.
Inside a compiled ``torch.func`` transform the loss is ``kd_kl_loss_reference``'s torch ops.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from kasmina.ops.backend import (
    check_float_tensor,
    check_temperature,
    saveable,
    through_dispatcher,
    traced_scalar,
    use_triton,
)
from kasmina.ops.kd_layout import grad_strides, new_grad
from kasmina.ops.kd_oracle import REDUCTIONS, kd_kl_loss_reference
from kasmina.ops.kd_tangent import kd_loss_tangent, probability_difference
from kasmina.ops.transforms import (
    first_order_backward,
    functorch_active,
    functorch_context,
    graph_anchor,
    in_compiled_transform,
    no_nested_forward_mode,
    no_vmap,
    tie_once,
)

__all__ = [
    "kd_backward_reference",
    "kd_forward_grad_reference",
    "kd_forward_reference",
    "kd_scale_grad_reference",
    "kd_kl_loss",
]

# The launcher (kasmina.kernels.kd_loss) repeats REDUCTIONS (kd_oracle) and _host_scale, as it
# imports no kasmina and this CPU path loads no Triton: tests/ops/test_kd_loss_kernels.py pins
# them equal.
LOG2E = 1.4426950408889634
LN2 = math.log(2.0)


# --------------------------------------------------------------------------- CPU path


def _host_scale(reduction: str, rows: int, vocab: int, masked: bool) -> float:
    """The reduction's scale known on the host (``1/rows_kept`` of a mask is on the device)."""
    factor = 1.0 / vocab if reduction == "mean" else 1.0
    if reduction in ("mean", "batchmean") and not masked:
        factor /= max(rows, 1)
    return factor


def _rows(
    student: Tensor, teacher: Tensor, work: torch.dtype, k: float | Tensor, careful: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row ``KL / ln2`` and ``(-M_a, -M_b, Z_a, Z_b)`` (each ``[..., 1]``) in base 2, ``M``
    the raw maximum logit of the row, ``Z = Σ 2^((x - M)·k)``, and ``KL / ln2 = k·X/Z_b +
    log2(Z_a/Z_b)`` with ``X = Σ 2^((t - M_b)·k)·((t - M_b) - (s - M_a))``; then the
    exponentials ``2^((s - M_a)·k)`` and ``2^((t - M_b)·k)`` themselves (logits-sized,
    ``work``), from which ``p = 2^(...)/Z`` costs no further ``exp2``.

    With ``careful``, teacher ``-inf`` terms of ``X`` are 0 (the difference is ``-inf``, or NaN
    when the student is ``-inf`` too), and a student ``-inf`` under a finite teacher logit gives
    ``+inf`` even where the teacher's weight underflowed to 0 (float64 says ``+inf`` there: the
    teacher logit is finite). Without, those terms are ``0·inf``: the only way the fast form
    errs is a NaN, which the caller sees and answers with the careful form. Three fp32
    logits-sized buffers, the fp32 copies of bf16/fp16 logits among them (a converted copy
    takes its ``x - M`` in place). Fifteen passes over the row, two of them ``exp2``.

    Every difference is taken off its own side's maximum first, as the kernels take it off
    their lanes' anchors: ``fl(fl(x - M)·k)`` in the exponents, exact near the maximum where
    the weight is, never ``ulp(k·x)``, which grows with the logits' offset and as ``1/T``; and
    ``(t - M_b) - (s - M_a)`` in ``X``, as large as the logits' spread, never ``fl(t - s)``,
    which carries the offset between the two sides (a student 1000 above its teacher). No
    ``lse = k·M + log2 Z`` is formed, whose ``ulp(k·M)`` would not cancel between the sides.
    """
    s_owned, t_owned = student.dtype != work, teacher.dtype != work
    s = student.to(work) if s_owned else student
    t = teacher.to(work) if t_owned else teacher
    neg_ma = s.amax(-1, keepdim=True).neg_()
    neg_mb = t.amax(-1, keepdim=True).neg_()
    t_off = t.add_(neg_mb) if t_owned else torch.add(t, neg_mb)  # a converted copy is spent
    s_off = s.add_(neg_ma) if s_owned else torch.add(s, neg_ma)
    e_b = torch.mul(t_off, k).exp2_()
    z_b = e_b.sum(-1, keepdim=True)
    diff = t_off.sub_(s_off)
    if careful:
        diff = diff.nan_to_num_(nan=0.0, posinf=math.inf, neginf=0.0)
    cross = diff.mul_(e_b).sum(-1, keepdim=True)  # e_b is kept for the gradient
    if careful:  # a NaN left is 0·inf: a student -inf under an underflowed teacher weight
        cross = cross.nan_to_num_(nan=math.inf, posinf=math.inf)
    e_a = s_off.mul_(k).exp2_()
    z_a = e_a.sum(-1, keepdim=True)
    row = torch.div(cross, z_b).mul_(k)
    return row.add_(torch.div(z_a, z_b).log2_()), neg_ma, neg_mb, z_a, z_b, e_a, e_b


def _loss_rows(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    temperature: float | Tensor,
    reduction: str,
) -> tuple[Tensor, Tensor | None, tuple[Tensor, ...]]:
    """``(loss, kept, rows)``: the reduced loss (divided by the device-side ``rows_kept`` when
    a mask meets ``mean``/``batchmean``), that count (or None) and ``_rows``'s other results,
    recomputed in the careful form when the loss holds a NaN."""
    work = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    k = LOG2E / temperature
    lead = tuple(student.shape[:-1])
    kept = None
    if mask is not None and reduction in ("mean", "batchmean"):
        kept = mask.sum(dtype=work).clamp_(min=1.0)
    factor = temperature * temperature * LN2
    if reduction in ("mean", "batchmean"):
        factor *= _host_scale(reduction, math.prod(lead), student.shape[-1], kept is not None)
    # On a CPU the host read that decides on the careful form is free; on any other device
    # (CUDA tensors forced onto the reference) it would be a sync, so the careful form runs.
    on_cpu = student.device.type == "cpu"
    for careful in (False, True) if on_cpu else (True,):
        row, *rest = _rows(student, teacher, work, k, careful)
        if mask is not None:
            row = row.squeeze(-1).masked_fill_(~mask, 0.0)
        # "none": ``mul``, not ``mul_``: a tensor of its own, not a view (an in-place op works)
        loss = row.view(lead).mul(factor) if reduction == "none" else row.sum().mul_(factor)
        if not on_cpu or not math.isnan(loss.sum().item() if reduction == "none" else loss.item()):
            break
    if kept is not None:
        loss = loss.div_(kept)
    return loss, kept, tuple(rest)


def kd_forward_reference(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    temperature: float | Tensor,
    reduction: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU path's forward: the kernel's quantities in whole-row torch ops, returned as
    ``kasmina.kernels.kd_loss.kd_forward`` returns them, ``(loss, stats, scale)``.

    It works in fp32 (float64 for float64 inputs, which only the tests pass) and spends one
    ``exp2`` per element and side. Small inputs are dominated by the per-op cost, so the op
    count is kept low: only when the loss holds a NaN (an infinite logit, or a NaN input) are
    the rows recomputed in the careful form, which a host read decides (free on a CPU; tensors
    on another device, CUDA ones forced onto the reference, always take the careful form, so
    that nothing syncs). A compiled call on such a device passes ``temperature`` as a 0-d
    tensor, which stays one (the same torch ops; no read). Eager autograd on a CPU uses
    ``kd_forward_grad_reference`` instead (the gradient from the same exponentials).
    """
    loss, kept, (neg_ma, neg_mb, z_a, z_b, _, _) = _loss_rows(
        student, teacher, mask, temperature, reduction
    )
    stats = torch.cat((neg_ma, neg_mb, z_a, z_b), -1) if need_grad else z_a.new_empty(0)
    scale = kept.reciprocal() if need_grad and kept is not None else stats.new_empty(0)
    return loss, stats, scale


def kd_forward_grad_reference(
    student: Tensor, teacher: Tensor, mask: Tensor | None, temperature: float, reduction: str
) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU path's forward for eager autograd: ``(loss, unscaled, scale)``, where
    ``unscaled = p_s - p_t`` (``[..., V]`` in fp32, masked rows 0) comes from the forward's own
    exponentials, ``p = 2^((x - M)·k)/Z``: two passes more here instead of a backward that converts
    and exponentiates both logits again (four ``exp2`` passes in all become two).
    ``kd_scale_grad_reference`` finishes it. The price is one fp32 logits-sized tensor kept
    from forward to backward, in place of 16 bytes a row (the GPU kernels keep only those)."""
    loss, kept, (_, _, z_a, z_b, e_a, e_b) = _loss_rows(
        student, teacher, mask, temperature, reduction
    )
    unscaled = e_a.div_(z_a).addcdiv_(e_b, z_b, value=-1.0)
    if mask is not None:
        unscaled = unscaled.masked_fill_(~mask.unsqueeze(-1), 0.0)
    scale = kept.reciprocal() if kept is not None else z_a.new_empty(0)
    return loss, unscaled, scale


def kd_scale_grad_reference(
    unscaled: Tensor,
    out: Tensor,
    scale: Tensor | None,
    grad_output: Tensor,
    temperature: float,
    reduction: str,
    mask: Tensor | None,
) -> Tensor:
    """The student gradient from ``kd_forward_grad_reference``'s ``unscaled``: times
    ``c = T·scale·grad_output`` in fp32, rounded once into ``out`` (the student's dtype and
    ``grad_strides``, see ``new_grad``) in one pass; ``unscaled`` is left as it is, for a
    retained graph. A masked row's gradient is 0 whatever its ``grad_output`` (its ``unscaled``
    is 0, and ``0·inf`` would be NaN): a per-row ``grad_output`` is zeroed there first (a row's
    worth of work), a non-finite scalar one fills the masked rows after."""
    rows, vocab = math.prod(out.shape[:-1]), out.shape[-1]
    c: Tensor | float = temperature * _host_scale(reduction, rows, vocab, mask is not None)
    if scale is not None and scale.numel() > 0:
        c = scale * c
    if grad_output.dim() == 0 and grad_output.device.type == "cpu" and isinstance(c, float):
        c = float(grad_output) * c
        fill = mask is not None and not math.isfinite(c)
    else:
        go = grad_output.to(unscaled.dtype)
        if go.dim() and mask is not None:
            go = go.masked_fill(~mask, 0.0)
        c = (go.unsqueeze(-1) if go.dim() else go) * c
        fill = mask is not None and not go.dim()  # a device scalar: not read on the host
    out = torch.mul(unscaled, c, out=out)
    return out.masked_fill_(~mask.unsqueeze(-1), 0.0) if fill and mask is not None else out


def kd_backward_reference(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    stats: Tensor,
    scale: Tensor | None,
    grad_output: Tensor,
    temperature: float | Tensor,
    reduction: str,
) -> Tensor:
    """The CPU path's backward, as ``kasmina.kernels.kd_loss.kd_backward``: ``(p_s - p_t)·c``
    with ``c = T·scale·grad_output`` and ``p = 2^(fl(x - M)·k)·(1/Z)``, in the stats' dtype,
    rounded once to the student's and laid out as ``grad_strides(student)``. The exponents are
    the forward's (``_rows``: ``add`` then ``mul_``) and ``c/Z`` is a per-row factor: ``Z`` (or
    ``log2 c``) folded into the exponent as ``lse = k·M + log2 Z`` would add ``ulp(lse)`` to
    every exponent, which grows with the logits' offset and as ``1/T``."""
    work = stats.dtype
    k = LOG2E / temperature
    rows, vocab = math.prod(student.shape[:-1]), student.shape[-1]
    host = temperature * _host_scale(reduction, rows, vocab, mask is not None)
    has_scale = scale is not None and scale.numel() > 0
    neg_ma, neg_mb, z_a, z_b = stats.split(1, -1)
    c: Tensor | float
    if grad_output.dim() == 0 and grad_output.device.type == "cpu":
        c = float(grad_output) * host * (float(scale) if has_scale else 1.0)
    else:
        c = grad_output.to(work) * host
        c = c.unsqueeze(-1) if c.dim() else c
        c = c * scale if has_scale else c
    # A converted (bf16/fp16) copy is ours: its buffer takes the exponentials.
    s = student if student.dtype == work else student.to(work)
    t = teacher if teacher.dtype == work else teacher.to(work)
    p_a = torch.add(s, neg_ma, out=None if s is student else s).mul_(k).exp2_().mul_(c / z_a)
    p_b = torch.add(t, neg_mb, out=None if t is teacher else t).mul_(k).exp2_().mul_(c / z_b)
    in_place = student.dtype == work and (
        student.is_contiguous() or p_a.stride() == grad_strides(student)
    )
    if mask is None and not in_place:  # the one rounding, written in place
        return torch.sub(p_a, p_b, out=new_grad(student))
    grad = p_a.sub_(p_b)
    if mask is not None:
        grad = grad.masked_fill_(~mask.unsqueeze(-1), 0.0)
    return grad if in_place else new_grad(student).copy_(grad)


# --------------------------------------------------------------------------- autograd wiring
# One pair of implementations (dispatching Triton vs reference), two wrappers: eager calls go
# through a torch.autograd.Function (cheap per call), torch.compile sees the custom ops (opaque
# nodes, no graph break), whose eager dispatcher round trip would cost several times more.


def _kernels():
    from kasmina.kernels import kd_loss as kernels  # lazy: triton only when used

    return kernels


def _on_host(temperature: Tensor) -> float | Tensor:
    """A compiled call's 0-d temperature as the float the eager path has where reading it is
    free (a CPU tensor); a device one stays on the device (a read would sync)."""
    return temperature.item() if temperature.device.type == "cpu" else temperature


def kd_forward_impl(
    student: Tensor, teacher: Tensor, mask: Tensor | None, temperature: float | Tensor,
    reduction: str, need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(loss, stats, scale)``: ``stats`` is empty without ``need_grad``, ``scale`` is empty
    unless a mask meets ``mean``/``batchmean`` with ``need_grad``. ``temperature`` is a float,
    or (compiled) a 0-d float64 tensor."""
    if use_triton(student.device):
        return _kernels().kd_forward(student, teacher, mask, temperature, reduction, need_grad)
    return kd_forward_reference(student, teacher, mask, temperature, reduction, need_grad)


def kd_backward_impl(
    student: Tensor, teacher: Tensor, mask: Tensor | None, stats: Tensor, scale: Tensor,
    grad_output: Tensor, temperature: float | Tensor, reduction: str,
) -> Tensor:  # fmt: skip
    """The student gradient, a fresh tensor with ``grad_strides(student)``."""
    if use_triton(student.device):
        return _kernels().kd_backward(
            student, teacher, mask, stats, scale, grad_output, temperature, reduction,
            out=new_grad(student),
        )  # fmt: skip
    return kd_backward_reference(
        student, teacher, mask, stats, scale, grad_output, temperature, reduction
    )


class _KDFunction(torch.autograd.Function):
    """Eager path (built when the student needs a gradient, or under a ``torch.func``
    transform). The Triton kernels keep the per-row statistics for the backward; the CPU path
    keeps the unscaled fp32 gradient, which its forward gets from exponentials it computes
    anyway. Either is returned as a non-differentiable output beside the loss (``forward`` takes
    no ``ctx``: the ``setup_context`` form, which ``torch.func.grad`` needs, since it runs the
    forward on the unwrapped tensors). ``vmap`` is refused with a clear error."""

    @staticmethod
    def forward(student, teacher, mask, temperature, reduction, anchor):  # type: ignore[override]
        if use_triton(student.device):
            return kd_forward_impl(student, teacher, mask, temperature, reduction, True)
        return kd_forward_grad_reference(student, teacher, mask, temperature, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        student, teacher, mask, temperature, reduction, anchor = inputs
        _, kept, scale = output  # the statistics (Triton) or the unscaled gradient (CPU)
        ctx.mark_non_differentiable(kept, scale)
        ctx.set_materialize_grads(False)  # no zeros made for them in the backward
        functorch_context(ctx, "kd_kl_loss")
        ctx.temperature, ctx.reduction = temperature, reduction
        ctx.cpu = not use_triton(student.device)
        if ctx.cpu:
            ctx.layout = (student.shape, grad_strides(student), student.dtype)
            # No student saved (its memory may go): the anchor ties a create_graph backward's
            # gradient to the student's graph (``first_order_backward``).
            ctx.save_for_backward(kept, scale, anchor, mask)
        else:
            ctx.save_for_backward(student, teacher, mask, kept, scale)
        if _forward_ad._current_level >= 0:  # forward mode runs (only then: memory): ``jvp``
            ctx.save_for_forward(
                *((kept, scale, mask, anchor) if ctx.cpu else (student, teacher, mask, kept, scale))
            )

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss, *_unused):  # type: ignore[override]
        if grad_loss is None:
            return None, None, None, None, None, None
        if ctx.cpu:
            unscaled, scale, _, mask = ctx.saved_tensors
            shape, strides, dtype = ctx.layout
            out = torch.empty_strided(shape, strides, dtype=dtype, device=unscaled.device)
            grad = kd_scale_grad_reference(
                unscaled, out, scale, grad_loss, ctx.temperature, ctx.reduction, mask
            )
            return grad, None, None, None, None, None
        student, teacher, mask, stats, scale = ctx.saved_tensors
        grad = kd_backward_impl(
            student, teacher, mask, stats, scale, grad_loss, ctx.temperature, ctx.reduction
        )
        return grad, None, None, None, None, None

    @staticmethod
    def jvp(ctx, t_student, *_unused):  # type: ignore[override]
        """The backward's transpose (``kd_tangent``): ``p_s - p_t`` is the CPU forward's own
        (saved), or formed from the kernels' statistics; the teacher's tangent adds nothing."""
        if t_student is None:
            return None, None, None
        if ctx.cpu:
            diff, scale, mask, anchor = ctx.saved_tensors
        else:
            student, teacher, mask, stats, scale = ctx.saved_tensors
            diff = probability_difference(student.detach(), teacher, stats, ctx.temperature)
            anchor = student
        # No graph of ``p_s - p_t``: a backward through the tangent (reverse over forward, an
        # HVP) would miss its term, so it raises naming the op (``tie_once``) instead.
        if not ctx.functorch:
            diff = tie_once("kd_kl_loss", diff, (anchor,))
        shape = t_student.shape
        host = _host_scale(ctx.reduction, math.prod(shape[:-1]), shape[-1], mask is not None)
        factor = ctx.temperature * host
        return kd_loss_tangent(diff, t_student, mask, scale, factor, ctx.reduction), None, None

    vmap = no_vmap("kd_kl_loss")


@torch.library.custom_op("kasmina::kd_kl_loss", mutates_args=())
def _kd_op(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    temperature: float,
    reduction: str,
    need_grad: bool,
    temperature_t: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    temp = temperature if temperature_t is None else _on_host(temperature_t)
    return kd_forward_impl(student, teacher, mask, temp, reduction, need_grad)


@_kd_op.register_fake
def _kd_fake(student, teacher, mask, temperature, reduction, need_grad, temperature_t=None):
    lead = student.shape[:-1]
    loss = student.new_empty(lead if reduction == "none" else (), dtype=torch.float32)
    stats = student.new_empty((*lead, 4) if need_grad else (0,), dtype=torch.float32)
    scaled = need_grad and mask is not None and reduction in ("mean", "batchmean")
    scale = student.new_empty(() if scaled else (0,), dtype=torch.float32)
    return loss, stats, scale


@torch.library.custom_op("kasmina::kd_kl_loss_backward", mutates_args=())
def _kd_backward_op(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    stats: Tensor,
    scale: Tensor,
    grad_output: Tensor,
    temperature: float,
    reduction: str,
    temperature_t: Tensor | None = None,
) -> Tensor:
    temp = temperature if temperature_t is None else _on_host(temperature_t)
    return kd_backward_impl(student, teacher, mask, stats, scale, grad_output, temp, reduction)


@_kd_backward_op.register_fake
def _kd_backward_fake(student, teacher, mask, stats, scale, grad_output, *_args):
    return new_grad(student)


def _setup_context(ctx, inputs, output) -> None:
    student, teacher, mask, temperature, reduction, _, temperature_t = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # the stats and scale outputs get no gradient
    ctx.save_for_backward(student, teacher, mask, output[1], output[2], temperature_t)
    ctx.temperature, ctx.reduction = temperature, reduction


def _op_backward(ctx, grad_loss: Tensor | None, _grad_stats=None, _grad_scale=None):
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return None, None, None, None, None, None, None
    student, teacher, mask, stats, scale, temp_t = ctx.saved_tensors
    grad = torch.ops.kasmina.kd_kl_loss_backward(
        student, teacher, mask, stats, scale, grad_loss, ctx.temperature, ctx.reduction, temp_t
    )
    return grad, None, None, None, None, None, None


_kd_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry


def _check(student: Tensor, teacher: Tensor, temperature: object, reduction: str, mask) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_temperature("temperature", temperature)
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

    See the module docstring for reductions, masking, dtypes, layouts and memory behaviour.
    Returns a float32 tensor: 0-d, or ``student_logits.shape[:-1]`` for ``reduction="none"``.
    Differentiable once: a second backward through its gradients (``create_graph=True``, then
    a gradient penalty) raises.
    """
    _check(student_logits, teacher_logits, temperature, reduction, mask)
    need_grad = student_logits.requires_grad and torch.is_grad_enabled()
    # A dual level open (forward-mode AD): the Function, whose rule carries a tangent the
    # kernels would drop, and whose forward runs on the primals (torch's out= ops refuse duals).
    function = need_grad or _forward_ad._current_level >= 0
    teacher = teacher_logits.detach()
    if function:  # the backward saves them
        teacher, mask = saveable(teacher), saveable(mask)
    if torch.compiler.is_compiling() and through_dispatcher() and not in_compiled_transform():
        temp_t = traced_scalar(temperature, torch.float64, student_logits.device)
        return _kd_op(student_logits, teacher, mask, 1.0, reduction, need_grad, temp_t)[0]
    temperature = float(temperature)
    if in_compiled_transform():  # plain torch ops: neither the custom op nor a Function serves
        return kd_kl_loss_reference(student_logits, teacher, temperature, reduction, mask)
    if functorch_active():
        no_nested_forward_mode("kd_kl_loss", reverse=True)  # its rule's p_s - p_t is constant
        return _KDFunction.apply(student_logits, teacher, mask, temperature, reduction, None)[0]
    if through_dispatcher():  # tracing, or a mode that fakes tensors (FakeTensorMode, ...)
        return _kd_op(student_logits, teacher, mask, temperature, reduction, need_grad)[0]
    if function:
        cpu_grad = need_grad and not use_triton(student_logits.device)
        anchor = graph_anchor(student_logits) if cpu_grad else None
        args = (student_logits, teacher, mask, temperature, reduction, anchor)
        return _KDFunction.apply(*args)[0]
    return kd_forward_impl(student_logits, teacher, mask, temperature, reduction, False)[0]
