"""``fused_linear_kd_loss``: ``kd_kl_loss`` of a linear head's logits without forming them.

The value and the gradients of ::

    kd_kl_loss(head_s(student_hidden), teacher, temperature, reduction, mask)
    head(x) = cap·tanh(scale·(x @ weight.T + bias) / cap)     (scale and cap optional)

where the teacher is given as logits, or as its own hidden states and head (``head_t``, computed
per chunk under ``no_grad``). Rows are all the leading dims of the hidden states, as in
``kd_kl_loss``; ``mask`` (bool, the leading dims' shape) drops rows exactly as there, and the
reductions are the same (``none``, ``sum``, ``mean`` = sum/(rows_kept·V), ``batchmean`` =
sum/rows_kept, an all-masked batch giving 0). Gradients go to ``student_hidden``,
``student_weight`` and ``student_bias``, never to the teacher. ``logit_scale`` is Cohere's
``logits·scale``; ``softcap`` is Gemma-2's final-logit soft-capping.

How (docs/design.md §2, "fused-linear KD"). Rows are processed ``chunk_rows`` at a time. For each
chunk the student's logits are one ``addmm`` into a reused ``[chunk_rows, V]`` buffer (the scale
folded into the GEMM's ``alpha``/``beta``, the soft-cap applied in place), the teacher's likewise
(or a view of the given logits), and the KD op's own forward and backward
(``kasmina.ops.kd_loss``: the Triton kernels on CUDA, the CPU path elsewhere) give the chunk's
loss and its logits gradient ``T·(p_s - p_t)``. The chain rule through the soft-cap
(``1 - (y/cap)²``, from the capped logits ``y`` themselves) is applied in place, and the chunk's
gradient is folded at once into ``grad_hidden`` (one GEMM into the chunk's rows),
``grad_weight`` (accumulated in fp32 for bf16/fp16 weights, in blocks of the vocabulary through
the spent logits buffer) and ``grad_bias`` (fp32). Chunks are independent because every row's
softmax is over V only, so the sum over chunks is the exact loss and the exact gradient (see
§2 for the argument). No ``[rows, V]`` tensor is ever allocated: the peak beyond the inputs and
the gradients is about one chunk's logits, gradient and scratch (docs/design.md §2 counts it:
2.7 GiB against eager's 24.7 GiB at 8×4096 rows, H 4096, V 128,256 in bf16, head trained).

With a scalar reduction the gradients are computed in the forward, unscaled (as for
``reduction="sum"``, so no fp16 gradient underflows under ``1/rows``), and the backward
multiplies them by ``grad_output·(reduction scale)`` in fp32, rounding the weight's and bias's
gradient once from their fp32 accumulators. The eager backward does all of it in place: the
hidden gradient is scaled in its own buffer, and each accumulator is rounded into the first
half of its own storage (``_round_in_place``), the gradient returned being a view of it, so no
second weight-sized buffer ever exists (a second backward through a retained graph recomputes
the spent gradients from the saved inputs). With ``reduction="none"`` the weight gradient
depends on the per-row ``grad_output``, so the forward keeps the per-row KD statistics
(``[rows, 4]`` fp32) and the backward recomputes each chunk's logits (two GEMMs per chunk more),
rounding its accumulators in place too. Under ``torch.compile`` a scalar reduction's backward
spends the buffers in place as well, through ``kasmina::fused_linear_kd_spend_`` (a custom op
that declares the mutation), and takes the gradients as views of them afterwards.

Default chunk size: ``default_chunk_rows`` (in ``kasmina.ops.fused_linear_kd_chunks``, with
the chunk engine) fits a chunk's scratch (student logits and their
gradient, the teacher's chunk when it is computed, plus the CPU path's fp32 temporaries on a
CPU) into ``DEFAULT_CHUNK_BYTES`` (512 MiB) on CUDA and ``DEFAULT_CPU_CHUNK_BYTES`` (64 MiB)
elsewhere, rounded down to a multiple of 64 rows; ``chunk_rows`` overrides it.

Eager calls go through a ``torch.autograd.Function``; under ``torch.compile`` the op is the
custom op ``kasmina::fused_linear_kd_loss`` (and, for its backward,
``kasmina::fused_linear_kd_spend_`` for scalar reductions and
``kasmina::fused_linear_kd_loss_backward`` for ``reduction="none"``), with fake
implementations and ``register_autograd``; both paths call the same implementation. The ops
take the temperature as a 0-d float64 tensor (a float argument would be guarded by value: a
temperature schedule would recompile each call); the logit scales and soft-caps are still
floats, guarded by value (they are a model's constants, not a schedule). Hidden
states that cannot be viewed as ``[rows, H]`` are copied (hidden-sized); teacher logits that
cannot be viewed as ``[rows, V]`` are gathered one chunk at a time. A ``[V, 0]`` head (hidden
size 0) gives logits equal to the bias and empty hidden and weight gradients of their shapes.

The backward is once-differentiable, as ``kd_kl_loss``'s (``first_order_backward``): first-order
gradients under ``create_graph=True`` are exact, and a second backward through them raises.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from kasmina.ops.backend import (
    check_float_tensor,
    check_temperature,
    saveable,
    through_dispatcher,
    traced_scalar,
)
from kasmina.ops.fused_linear_kd_chunks import (
    _backward_rows,
    _Config,
    _forward,
    _spend_grads,
    _spent_views,
    default_chunk_rows,
)
from kasmina.ops.kd_loss import _on_host
from kasmina.ops.kd_oracle import REDUCTIONS, kd_kl_loss_reference
from kasmina.ops.transforms import first_order_backward, functorch_active
from kasmina.utils.checks import check_positive, check_positive_int

__all__ = ["fused_linear_kd_loss", "fused_linear_kd_loss_reference"]


# --------------------------------------------------------------------------- oracle


def _head_reference(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float | None, cap: float | None
) -> Tensor:
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if scale is not None:
        logits = logits * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def fused_linear_kd_loss_reference(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> Tensor:
    """Plain torch, logits materialised: the test oracle (differentiable by autograd; run it in
    float64 for a reference)."""
    _teacher_head_options(teacher_logits, teacher_logit_scale, teacher_softcap)
    student = _head_reference(
        student_hidden, student_weight, student_bias, student_logit_scale, student_softcap
    )
    if teacher_logits is None:
        assert teacher_hidden is not None and teacher_weight is not None
        teacher = _head_reference(
            teacher_hidden.detach(), teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
            teacher_logit_scale, teacher_softcap,
        )  # fmt: skip
    else:
        teacher = teacher_logits
    return kd_kl_loss_reference(student, teacher.detach(), temperature, reduction, mask)


# --------------------------------------------------------------------------- autograd wiring


def _recomputed(inputs: tuple[Tensor | None, ...], cfg: _Config) -> tuple[Tensor, ...]:
    """The forward's unscaled gradients again, ``(grad_h, acc_w, acc_b, scale)``, for a
    backward that finds them spent by an earlier backward of a retained graph (one more
    chunked pass, the same ops in the same order: the same gradients)."""
    with torch.no_grad():
        return _forward(*inputs, cfg)[1:5]


class _FusedFunction(torch.autograd.Function):
    """Eager path (only built when a student input needs a gradient).

    With a scalar reduction the forward's unscaled gradients live on ``ctx`` (not among the
    saved tensors, whose version counters would forbid the in-place use) and the backward
    spends them in place (``_spend_grads``), dropping them from ``ctx``. A second backward
    through a retained graph finds them spent and recomputes them from the saved inputs (one
    more chunked pass, the same ops in the same order, so the same gradients)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, mask, cfg):  # type: ignore[override]
        loss, grad_h, acc_w, acc_b, scale, stats = _forward(
            hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, mask, cfg
        )
        ctx.cfg, ctx.op = cfg, "fused_linear_kd_loss"
        ctx.save_for_backward(
            hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, mask, stats
        )
        ctx.grads = None if cfg.reduction == "none" else (grad_h, acc_w, acc_b, scale)
        return loss

    @staticmethod
    @first_order_backward
    def backward(ctx, grad_loss):  # type: ignore[override]
        cfg: _Config = ctx.cfg
        hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, mask, stats = ctx.saved_tensors
        if cfg.reduction == "none":
            gh, gw, gb = _backward_rows(
                hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, mask, stats,
                grad_loss, cfg,
            )  # fmt: skip
            grads = (
                gh if cfg.need_hidden else None,
                gw if cfg.need_weight else None,
                gb if cfg.need_bias else None,
            )
        else:
            unscaled, ctx.grads = ctx.grads, None
            if unscaled is None:  # spent by an earlier backward of a retained graph
                inputs = (hidden, weight, bias, t_logits, t_hidden, t_weight, t_bias, mask)
                unscaled = _recomputed(inputs, cfg)
            grads = _spend_grads(grad_loss, *unscaled, weight, bias, mask, cfg)
        return (*grads, None, None, None, None, None, None)


# The custom ops' schemas, each argument list written once: the tensors every op reads, then the
# settings (in ``_Config``'s order, so ``_Config(*args[8:])`` rebuilds it). The ops' Python
# bodies take ``*args`` in this order; only the kernels in ``fused_linear_kd_chunks`` name them.
_INPUTS = (
    "Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_logits, Tensor? teacher_hidden, "
    "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? mask"
)
_HEADS = (
    "float? student_scale, float? teacher_scale, float? student_cap, float? teacher_cap, "
    "bool need_hidden, bool need_weight, bool need_bias"
)
# A row count no budget reaches: the default chunk of a traced call whose count is symbolic.
_ANY_ROWS = 1 << 62
_SETTINGS = f"Tensor temperature, str reduction, SymInt chunk_rows, {_HEADS}"
_N_INPUTS = 8
_N_ARGS = _N_INPUTS + len(_SETTINGS.split(","))  # the forward op's


@torch.library.custom_op(
    "kasmina::fused_linear_kd_loss",
    mutates_args=(),
    schema=f"({_INPUTS}, {_SETTINGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _fused_op(*args: Any) -> tuple[Tensor, ...]:
    outputs = _forward(*args[:_N_INPUTS], _run_config(args[_N_INPUTS:]))
    return (*outputs, torch.zeros((), dtype=torch.bool))  # not spent yet (a CPU marker)


@_fused_op.register_fake
def _fused_fake(*args):
    hidden, weight, bias = args[:3]
    cfg = _Config(*args[_N_INPUTS:])
    lead = hidden.shape[:-1]
    f32 = torch.promote_types(hidden.dtype, torch.float32)
    acc = torch.promote_types(weight.dtype, f32)
    loss = hidden.new_empty(lead if cfg.reduction == "none" else (), dtype=f32)
    now = cfg.need_grad and cfg.reduction != "none"
    grad_h = hidden.new_empty(hidden.shape if now and cfg.need_hidden else (0,))
    acc_w = weight.new_empty(weight.shape if now and cfg.need_weight else (0,), dtype=acc)
    bias_shape = bias.shape if now and cfg.need_bias and bias is not None else (0,)
    acc_b = hidden.new_empty(bias_shape, dtype=acc if now else f32)
    scale = hidden.new_empty((), dtype=f32)
    rows = math.prod(lead) if cfg.need_grad and cfg.reduction == "none" else 0
    stats = hidden.new_empty((rows, 4), dtype=f32)
    spent = torch.empty((), dtype=torch.bool, device="cpu")
    return loss, grad_h, acc_w, acc_b, scale, stats, spent


def _run_config(settings: tuple[Any, ...]) -> _Config:
    """An op body's ``_Config``: its 0-d temperature tensor (a float argument would be guarded
    by value, a recompile per value of a schedule) read where that is free (a CPU one), else
    kept on the device for the kernels to load."""
    cfg = _Config(*settings)
    return dataclasses.replace(cfg, temperature=_on_host(cfg.temperature))


def _backward_cfg(settings: tuple[Any, ...]) -> _Config:
    """The backward op's settings (``temperature, chunk_rows, heads...``: no reduction)."""
    temperature, chunk_rows, *heads = settings
    return _Config(temperature, "none", chunk_rows, *heads)


@torch.library.custom_op(
    "kasmina::fused_linear_kd_loss_backward",
    mutates_args=(),
    schema=(
        f"({_INPUTS}, Tensor stats, Tensor grad_output, Tensor temperature, SymInt chunk_rows, "
        f"{_HEADS}) -> (Tensor, Tensor, Tensor)"
    ),
)
def _fused_backward_op(*args: Any) -> tuple[Tensor, ...]:
    stats, grad_output = args[_N_INPUTS : _N_INPUTS + 2]
    cfg = _backward_cfg(args[_N_INPUTS + 2 :])
    cfg = dataclasses.replace(cfg, temperature=_on_host(cfg.temperature))
    return _backward_rows(*args[:_N_INPUTS], stats, grad_output, cfg)


@_fused_backward_op.register_fake
def _fused_backward_fake(*args):
    hidden, weight, bias = args[:3]
    stats = args[_N_INPUTS]
    cfg = _backward_cfg(args[_N_INPUTS + 2 :])
    grad_h = hidden.new_empty(hidden.shape if cfg.need_hidden else (0,))
    grad_w = weight.new_empty(weight.shape if cfg.need_weight else (0,))
    if bias is not None and cfg.need_bias:
        grad_b = bias.new_empty(bias.shape)
    else:
        grad_b = stats.new_empty((0,))
    return grad_h, grad_w, grad_b


@torch.library.custom_op(
    "kasmina::fused_linear_kd_spend_",
    mutates_args=("grad_h", "acc_w", "acc_b", "spent"),
    schema=(
        "(Tensor grad_loss, Tensor(a1!) grad_h, Tensor(a2!) acc_w, Tensor(a3!) acc_b, "
        f"Tensor scale, Tensor(a5!) spent, {_INPUTS}, {_SETTINGS}) -> ()"
    ),
)
def _spend_op(*args: Any) -> None:
    """The traced backward of a scalar reduction: the forward's unscaled gradients scaled and
    rounded in their own buffers (``_spend_grads``), which the caller then views as the
    gradients (``_spent_views``), so the compiled backward allocates nothing gradient-sized
    either. ``spent`` (a CPU bool, free to read) marks buffers an earlier backward of a
    retained graph used: they are recomputed from the inputs first, as the eager path does."""
    grad_loss, grad_h, acc_w, acc_b, scale, spent = args[:6]
    inputs = args[6 : 6 + _N_INPUTS]
    cfg = _run_config(args[6 + _N_INPUTS :])
    if bool(spent):
        for buffer, value in zip((grad_h, acc_w, acc_b, scale), _recomputed(inputs, cfg),
                                 strict=True):  # fmt: skip
            buffer.copy_(value)
    _spend_grads(grad_loss, grad_h, acc_w, acc_b, scale, inputs[1], inputs[2], inputs[7], cfg)
    spent.fill_(True)


@_spend_op.register_fake
def _spend_fake(*_args: object) -> None:
    return None  # it only mutates its inputs


def _setup_context(ctx, inputs, output) -> None:
    cfg = _Config(*inputs[_N_INPUTS:])
    _, grad_h, acc_w, acc_b, scale, stats, spent = output
    ctx.mark_non_differentiable(grad_h, acc_w, acc_b, scale, stats, spent)
    ctx.set_materialize_grads(False)
    ctx.cfg = dataclasses.replace(cfg, temperature=None)  # a tensor: saved as one, last
    if cfg.reduction == "none":
        ctx.save_for_backward(*inputs[:_N_INPUTS], stats, cfg.temperature)
    else:
        ctx.save_for_backward(
            grad_h, acc_w, acc_b, scale, spent, *inputs[:_N_INPUTS], cfg.temperature
        )


def _op_backward(ctx, grad_loss: Tensor | None, *_unused):
    nothing = (None,) * _N_ARGS
    if grad_loss is None:
        return nothing
    *saved, temperature = ctx.saved_tensors
    cfg: _Config = dataclasses.replace(ctx.cfg, temperature=temperature)
    heads = (cfg.student_scale, cfg.teacher_scale, cfg.student_cap, cfg.teacher_cap,
             cfg.need_hidden, cfg.need_weight, cfg.need_bias)  # fmt: skip
    if cfg.reduction == "none":
        *inputs, stats = saved
        gh, gw, gb = torch.ops.kasmina.fused_linear_kd_loss_backward(
            *inputs, stats, grad_loss, cfg.temperature, cfg.chunk_rows, *heads
        )
        grads = (
            gh if cfg.need_hidden else None,
            gw if cfg.need_weight else None,
            gb if cfg.need_bias else None,
        )
    else:
        grad_h, acc_w, acc_b, scale, spent, *inputs = saved
        torch.ops.kasmina.fused_linear_kd_spend_(
            grad_loss, grad_h, acc_w, acc_b, scale, spent, *inputs, cfg.temperature,
            cfg.reduction, cfg.chunk_rows, *heads,
        )  # fmt: skip
        grads = _spent_views(grad_h, acc_w, acc_b, inputs[1], inputs[2], cfg)
    return (*grads, *nothing[3:])


_fused_op.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- public entry


def head_factor(name: str, value: object) -> float | None:
    """A head's logit scale or soft-cap: None, or a float > 0 that float32 holds as a finite
    number (the kernels take it as a float32 scalar, whatever the logits' dtype), and for a cap
    a normal one, else ``ValueError``: a cap that is inf there makes the capped logits
    ``inf·tanh(0)``, NaN, one that is 0 there the cap's gradient factor ``y/cap`` 0/0, and a
    scale that is inf there overflows inside ``addmm``."""
    if value is None:
        return None
    value = float(check_positive(name, value))
    info = torch.finfo(torch.float32)
    low = info.tiny if name.endswith("softcap") else 0.0
    if not low <= value <= info.max:
        raise ValueError(f"{name} must be in [{low:g}, {info.max:g}] (float32), got {value!r}")
    return value


def _check_head(side: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    check_float_tensor(f"{side}_hidden", hidden)
    check_float_tensor(f"{side}_weight", weight, hidden.device)
    if hidden.dim() == 0:
        raise ValueError(f"{side}_hidden needs a last (hidden) dim, got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(
            f"{side}_weight must be [V, {hidden.shape[-1]}] with V > 0, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"{side}_weight dtype {weight.dtype} must equal {side}_hidden dtype {hidden.dtype}"
        )
    if bias is not None:
        check_float_tensor(f"{side}_bias", bias, hidden.device)
        if bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(
                f"{side}_bias must be a {weight.dtype} tensor of shape ({weight.shape[0]},), "
                f"got {bias.dtype} {tuple(bias.shape)}"
            )


def _teacher_head_options(logits: Tensor | None, scale: object, cap: object) -> None:
    """A teacher's scale and cap act on its head's logits: given logits, they were ignored."""
    if logits is not None and (scale is not None or cap is not None):
        raise ValueError(
            "teacher_logit_scale and teacher_softcap apply to a teacher head (teacher_hidden "
            "and teacher_weight); teacher_logits are taken as given: scale or cap them first"
        )


def _check(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
    reduction: str, mask: Tensor | None,
) -> None:  # fmt: skip
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_head("student", hidden, weight, bias)
    lead, vocab = tuple(hidden.shape[:-1]), weight.shape[0]
    if (teacher_logits is None) == (teacher_hidden is None and teacher_weight is None):
        raise ValueError("give either teacher_logits or teacher_hidden and teacher_weight")
    if teacher_logits is not None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with teacher_hidden/teacher_weight, not logits")
        check_float_tensor("teacher_logits", teacher_logits, hidden.device)
        if tuple(teacher_logits.shape) != (*lead, vocab):
            raise ValueError(
                f"teacher_logits shape {tuple(teacher_logits.shape)} must be {(*lead, vocab)}"
            )
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight go together")
        _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
        if teacher_hidden.device != hidden.device:
            raise ValueError(
                f"teacher_hidden is on {teacher_hidden.device}, expected {hidden.device}"
            )
        if tuple(teacher_hidden.shape[:-1]) != lead or teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"the teacher's rows {tuple(teacher_hidden.shape[:-1])} and vocabulary "
                f"{teacher_weight.shape[0]} must match the student's {lead} and {vocab}"
            )
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise ValueError("mask must be a bool tensor")
        if mask.device != hidden.device:
            raise ValueError(f"mask is on {mask.device}, expected {hidden.device}")
        if tuple(mask.shape) != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} must equal the rows' shape {lead}")


def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
    chunk_rows: int | None = None,
    student_logit_scale: float | None = None,
    teacher_logit_scale: float | None = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> Tensor:
    """``kd_kl_loss(head(student_hidden), teacher, temperature, reduction, mask)`` chunked over
    rows, the ``[rows, V]`` logits never allocated (module docstring; docs/design.md §2).

    ``student_hidden`` ``[..., H]`` and ``student_weight`` ``[V, H]`` (an ``nn.Linear``'s
    weight) share a float dtype; ``student_bias`` is ``[V]``. The teacher is
    ``teacher_logits`` ``[..., V]`` or ``teacher_hidden`` ``[..., H_t]`` with
    ``teacher_weight`` ``[V, H_t]`` (and ``teacher_bias``). ``*_logit_scale`` multiplies the
    head's logits; ``*_softcap`` caps them as ``cap·tanh(z/cap)`` (after the scale). Both are
    floats > 0 in float32's range (``head_factor``). ``chunk_rows`` (int >= 1)
    overrides ``default_chunk_rows``. Returns a float32 tensor: 0-d, or the rows' shape for
    ``reduction="none"``. Differentiable once: a second backward through its gradients
    (``create_graph=True``, then a gradient penalty) raises.
    """
    if not torch.compiler.is_compiling() and functorch_active():  # needs plain tensors
        raise RuntimeError(
            "fused_linear_kd_loss does not support torch.func transforms (vmap, grad, vjp, ...): "
            "call it on the batched tensors directly, and use autograd for its gradients"
        )
    _check(
        student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
        teacher_weight, teacher_bias, reduction, mask,
    )  # fmt: skip
    temperature = check_temperature("temperature", temperature)
    s_scale = head_factor("student_logit_scale", student_logit_scale)
    t_scale = head_factor("teacher_logit_scale", teacher_logit_scale)
    s_cap = head_factor("student_softcap", student_softcap)
    t_cap = head_factor("teacher_softcap", teacher_softcap)
    _teacher_head_options(teacher_logits, t_scale, t_cap)
    rows, vocab = math.prod(student_hidden.shape[:-1]), student_weight.shape[0]
    if chunk_rows is None:
        computed = teacher_hidden.dtype if teacher_hidden is not None else None
        # Traced with a dynamic row count (torch.export, a dynamic compile) the budget's chunk
        # is taken for every count: the op clamps a chunk to the rows it gets, and comparing
        # the symbolic count with the budget would guard the graph on it.
        budgeted = rows if isinstance(rows, int) else _ANY_ROWS
        chunk = default_chunk_rows(
            budgeted, vocab, student_hidden.dtype, computed, device_type=student_hidden.device.type
        )
    else:  # an int or another library's integer (NumPy), never a bool or a float
        chunk = check_positive_int("chunk_rows", chunk_rows)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and student_hidden.requires_grad
    need_w = grad_on and student_weight.requires_grad
    need_b = grad_on and student_bias is not None and student_bias.requires_grad
    keep = saveable if need_h or need_w or need_b else lambda t: t  # the backward saves them
    t_args = tuple(
        None if t is None else keep(t.detach())
        for t in (teacher_logits, teacher_hidden, teacher_weight, teacher_bias)
    )
    mask = keep(mask)
    if through_dispatcher():  # tracing, or a mode that fakes tensors (FakeTensorMode, ...)
        temp_t = traced_scalar(temperature, torch.float64, student_hidden.device)
        return _fused_op(
            student_hidden, student_weight, student_bias, *t_args, mask, temp_t,
            reduction, chunk, s_scale, t_scale, s_cap, t_cap, need_h, need_w, need_b,
        )[0]  # fmt: skip
    cfg = _Config(
        temperature, reduction, chunk, s_scale, t_scale, s_cap, t_cap, need_h, need_w, need_b
    )
    if cfg.need_grad:
        return _FusedFunction.apply(
            student_hidden, student_weight, student_bias, *t_args, mask, cfg
        )
    with torch.no_grad():
        return _forward(student_hidden, student_weight, student_bias, *t_args, mask, cfg)[0]
