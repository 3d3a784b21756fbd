"""``alpha_blend``: how a seed's output enters the host's activations.

``blend``: ``alpha*seed + (1-alpha)*host.detach()`` — the seed trains, the host receives no
gradient through this path (its ``.grad`` stays ``None``), and a tensor ``alpha`` that requires
grad gets ``sum(g*(seed-host))`` reduced to its own shape.
``incubate`` (straight-through): the value is exactly ``host`` and the host's gradient is exactly
``g``, as if the seed were absent, while the seed also receives ``g`` so it can learn.

``alpha`` is a Python float (passed straight to the kernel: no tensor, no host sync), a 0-d
tensor (read on the device), or a 1-d tensor of length ``C`` dividing the last dim: chunk ``k``
of the last dim (width ``last_dim // C``) uses ``alpha[k]``.

Non-contiguous inputs are made contiguous (a copy) rather than rejected: blending a sliced
activation is legitimate and the copy is what any kernel would need. Wrong dtype, device or
shape, a bad ``mode`` or a bad ``alpha`` raise ``ValueError``.

CUDA tensors run the Triton kernels of ``kasmina.kernels.alpha_blend``; CPU tensors run the
torch reference below (see ``kasmina.ops.backend``). Under ``torch.compile`` the op is a
``torch.library.custom_op`` (one opaque node, no graph break, forward and backward); eager calls
use an equivalent ``torch.autograd.Function``, which costs far less per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kasmina.ops.backend import check_float_tensor, use_triton

__all__ = ["alpha_blend", "alpha_blend_reference"]

MODES = ("blend", "incubate")


# --------------------------------------------------------------------------- reference


def _alpha_per_column(alpha: Tensor | float, last_dim: int) -> Tensor | float:
    """Expand a per-chunk alpha ``[C]`` to one value per column of the last dim ``[D]``."""
    if isinstance(alpha, Tensor) and alpha.dim() == 1:
        return alpha.repeat_interleave(last_dim // alpha.numel())
    return alpha


class _StraightThrough(torch.autograd.Function):
    """Value of ``host``; gradient ``g`` to both ``host`` and ``seed``."""

    @staticmethod
    def forward(ctx, seed: Tensor, host: Tensor) -> Tensor:  # type: ignore[override]
        return host.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return grad, grad


def alpha_blend_reference(
    seed_out: Tensor, host_out: Tensor, alpha: Tensor | float, mode: str = "blend"
) -> Tensor:
    """Plain-torch ``alpha_blend``: the CPU path's math and a test oracle.

    Differentiable by ordinary autograd (so ``gradcheck`` applies). Computes in at least fp32
    and rounds once to the input dtype, like the kernel.
    """
    if mode == "incubate":
        return _StraightThrough.apply(seed_out, host_out)
    work = torch.promote_types(seed_out.dtype, torch.float32)
    a = _alpha_per_column(alpha, seed_out.shape[-1] if seed_out.dim() else 1)
    if isinstance(a, Tensor):
        a = a.to(work)
    out = a * seed_out.to(work) + (1 - a) * host_out.detach().to(work)
    return out.to(seed_out.dtype)


def _blend_backward_reference(
    grad: Tensor, seed: Tensor | None, host: Tensor | None, alpha: Tensor | None, alpha_value: float
) -> tuple[Tensor, Tensor]:
    """Gradients of ``blend`` for the CPU path: ``(alpha*g, sum(g*(seed-host)) or empty)``."""
    work = torch.promote_types(grad.dtype, torch.float32)
    a: Tensor | float = alpha_value
    if alpha is not None:
        a = _alpha_per_column(alpha.to(work), grad.shape[-1] if grad.dim() else 1)
    g = grad.to(work)
    grad_seed = (a * g).to(grad.dtype)
    if seed is None or host is None or alpha is None:
        return grad_seed, grad.new_empty(0)
    prod = g * (seed.to(work) - host.to(work))
    if alpha.dim() == 0:
        grad_alpha = prod.sum()
    else:
        d = prod.shape[-1]
        grad_alpha = prod.reshape(-1, alpha.numel(), d // alpha.numel()).sum(dim=(0, 2))
    return grad_seed, grad_alpha.to(alpha.dtype)


# --------------------------------------------------------------------------- autograd wiring
# One pair of implementations (dispatching Triton vs reference), two wrappers: eager calls go
# through a torch.autograd.Function (a few µs per call), torch.compile sees the custom ops (one
# opaque node each way, no graph break). The custom op's eager round trip through the
# dispatcher costs several times more, which is why eager code does not use it.


def _kernels():
    from kasmina.kernels import alpha_blend as kernels  # lazy: triton only when used

    return kernels


def _forward_impl(
    seed: Tensor, host: Tensor, alpha: Tensor | None, alpha_value: float, mode: str
) -> Tensor:
    if mode == "incubate":
        return host.clone()
    if use_triton(seed.device):
        return _kernels().blend_forward(seed, host, alpha, alpha_value)
    return alpha_blend_reference(seed, host, alpha if alpha is not None else alpha_value)


def _backward_impl(
    grad: Tensor, seed: Tensor | None, host: Tensor | None, alpha: Tensor | None, alpha_value: float
) -> tuple[Tensor, Tensor]:
    """``(grad_seed, grad_alpha)``; ``grad_alpha`` is empty unless seed and host are given."""
    grad = grad.contiguous()
    if use_triton(grad.device):
        return _kernels().blend_backward(grad, seed, host, alpha, alpha_value)
    return _blend_backward_reference(grad, seed, host, alpha, alpha_value)


def _save(ctx, seed: Tensor, host: Tensor, alpha: Tensor | None, alpha_value: float, mode: str):
    """Keep seed and host only when alpha needs a gradient; blend needs nothing else."""
    ctx.mode = mode
    ctx.alpha_value = alpha_value
    ctx.alpha_needs_grad = mode == "blend" and alpha is not None and ctx.needs_input_grad[2]
    if ctx.alpha_needs_grad:
        ctx.save_for_backward(seed, host, alpha)
    else:
        ctx.save_for_backward(alpha)


def _grads(ctx, grad: Tensor, backward_fn) -> tuple[Tensor | None, ...]:
    if ctx.mode == "incubate":
        return grad, grad, None, None, None
    if ctx.alpha_needs_grad:
        seed, host, alpha = ctx.saved_tensors
    else:
        (alpha,) = ctx.saved_tensors
        seed = host = None
    grad_seed, grad_alpha = backward_fn(grad, seed, host, alpha, ctx.alpha_value)
    return grad_seed, None, (grad_alpha if ctx.alpha_needs_grad else None), None, None


class _AlphaBlendFunction(torch.autograd.Function):
    """Eager path."""

    @staticmethod
    def forward(ctx, seed, host, alpha, alpha_value, mode):  # type: ignore[override]
        _save(ctx, seed, host, alpha, alpha_value, mode)
        return _forward_impl(seed, host, alpha, alpha_value, mode)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _grads(ctx, grad, _backward_impl)


@torch.library.custom_op("kasmina::alpha_blend", mutates_args=())
def _alpha_blend_op(
    seed: Tensor, host: Tensor, alpha: Tensor | None, alpha_value: float, mode: str
) -> Tensor:
    return _forward_impl(seed, host, alpha, alpha_value, mode)


@_alpha_blend_op.register_fake
def _alpha_blend_fake(seed, host, alpha, alpha_value, mode):
    return torch.empty_like(host)


@torch.library.custom_op("kasmina::alpha_blend_backward", mutates_args=())
def _alpha_blend_backward_op(
    grad: Tensor, seed: Tensor | None, host: Tensor | None, alpha: Tensor | None, alpha_value: float
) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad, seed, host, alpha, alpha_value)


@_alpha_blend_backward_op.register_fake
def _alpha_blend_backward_fake(grad, seed, host, alpha, alpha_value):
    wants_alpha = seed is not None and host is not None and alpha is not None
    grad_alpha = torch.empty_like(alpha) if wants_alpha else grad.new_empty(0)
    return torch.empty_like(grad), grad_alpha


_alpha_blend_op.register_autograd(
    lambda ctx, grad: _grads(ctx, grad, torch.ops.kasmina.alpha_blend_backward),
    setup_context=lambda ctx, inputs, output: _save(ctx, *inputs),
)


# --------------------------------------------------------------------------- public entry


def _check(seed_out: Tensor, host_out: Tensor, alpha: object, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_float_tensor("seed_out", seed_out)
    check_float_tensor("host_out", host_out, seed_out.device)
    if host_out.dtype != seed_out.dtype:
        raise ValueError(
            f"seed_out ({seed_out.dtype}) and host_out ({host_out.dtype}) must share a dtype"
        )
    if host_out.shape != seed_out.shape:
        raise ValueError(
            f"seed_out {tuple(seed_out.shape)} and host_out {tuple(host_out.shape)} must have "
            "the same shape"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, Tensor)):
        raise ValueError(f"alpha must be a float or a tensor, got {type(alpha).__name__}")
    if isinstance(alpha, Tensor):
        check_float_tensor("alpha", alpha, seed_out.device)
        if alpha.dim() > 1:
            raise ValueError(f"alpha must be 0-d or 1-d, got shape {tuple(alpha.shape)}")
        if alpha.dim() == 1:
            if seed_out.dim() == 0:
                raise ValueError("per-chunk (1-d) alpha needs seed_out with at least one dim")
            last = seed_out.shape[-1]
            if alpha.numel() == 0 or last % alpha.numel() != 0:
                raise ValueError(
                    f"per-chunk alpha of length {alpha.numel()} must divide the last dim "
                    f"({last}) of seed_out {tuple(seed_out.shape)}"
                )


def alpha_blend(
    seed_out: Tensor, host_out: Tensor, alpha: Tensor | float, mode: str = "blend"
) -> Tensor:
    """Blend ``seed_out`` into ``host_out`` (see the module docstring for the exact contract).

    Args:
        seed_out, host_out: same shape, dtype (fp32/fp16/bf16) and device.
        alpha: float, 0-d tensor, or 1-d per-chunk tensor on the same device (any of the three
            float dtypes). Ignored by ``incubate``.
        mode: ``"blend"`` or ``"incubate"``.
    """
    _check(seed_out, host_out, alpha, mode)
    if isinstance(alpha, Tensor):
        alpha_t, alpha_value = alpha.contiguous(), 0.0
    else:
        alpha_t, alpha_value = None, float(alpha)
    args = (seed_out.contiguous(), host_out.contiguous(), alpha_t, alpha_value, mode)
    if torch.compiler.is_compiling():
        return _alpha_blend_op(*args)
    return _AlphaBlendFunction.apply(*args)
