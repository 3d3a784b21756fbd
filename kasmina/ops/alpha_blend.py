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
``torch.library.custom_op`` (one opaque node, no graph break, forward and backward), which
takes a float alpha as a 0-d tensor (a float changing between calls is no recompile); eager calls
use an equivalent ``torch.autograd.Function``, which costs far less per call. On the CPU, eager
calls that record no graph skip it, and most that do use lerp's own autograd (``_native_blend``).
Range: the CPU path is ``torch.lerp``, which forms ``seed - host``; where that difference
overflows the dtype (values near its maximum on opposite sides: ``3e38`` against ``-3e38``) the
blend is infinite or NaN where the kernels' ``alpha*seed + (1-alpha)*host`` is finite, and so is
an alpha's gradient ``sum(g*(seed-host))`` on both. A healthy activation is far from this.

Higher order: a backward under ``create_graph=True`` (a gradient penalty) computes the gradients
with differentiable torch ops (``_blend_backward_graph``), in both wrappers and on both backends,
so a second backward is exact; a plain backward runs the kernels, which record no graph.
Inside a compiled ``torch.func`` transform the blend is plain torch ops (``_blend_in_torch_ops``).
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from kasmina.ops.backend import (
    check_float_tensor,
    saveable,
    through_dispatcher,
    traced_scalar,
    use_triton,
)
from kasmina.ops.blend_tangent import blend_tangent, tangent_sum
from kasmina.ops.transforms import (
    functorch_active,
    in_compiled_transform,
    no_nested_forward_mode,
    no_vmap,
)
from kasmina.utils.checks import check_real

__all__ = [
    "alpha_blend",
    "alpha_blend_reference",
    "blend_chunks",
    "blend_chunks_seed_grad",
    "seed_blend",
]

MODES = ("blend", "incubate")


# --------------------------------------------------------------------------- reference


class _StraightThrough(torch.autograd.Function):
    """Value of ``host``; gradient ``g`` to both ``host`` and ``seed`` (torch ops only, so
    ``torch.func`` may derive its ``vmap``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(seed: Tensor, host: Tensor) -> Tensor:  # type: ignore[override]
        return host.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        """Nothing to save: the backward hands ``g`` through unchanged."""

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return grad, grad

    @staticmethod
    def jvp(ctx, t_seed: Tensor | None, t_host: Tensor | None) -> Tensor | None:
        """The backward's transpose: ``t_seed + t_host``."""
        return tangent_sum(t_seed, t_host)


_FP32_MAX = torch.finfo(torch.float32).max
# The dtype the math runs in: fp32 for fp16/bf16 data, the data's own dtype otherwise.
_WORK = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def _cpu_scalar(alpha: Tensor | None, alpha_value: float) -> float | None:
    """``alpha`` as a Python float when that costs no device sync (CPU, one element), else None.

    A Python float reaches torch's kernels as an fp32 (opmath) scalar: fp16/bf16 inputs are
    upcast, multiplied in fp32 and rounded once, exactly the kernels' contract, in one pass. A
    0-d fp32 *tensor* next to bf16 data would instead be rounded to bf16 first.
    """
    if alpha is None:
        return alpha_value
    if alpha.dim() == 0 and alpha.is_cpu:
        return float(alpha)
    return None


def alpha_blend_reference(
    seed_out: Tensor, host_out: Tensor, alpha: Tensor | float, mode: str = "blend"
) -> Tensor:
    """Plain-torch ``alpha_blend``: the CPU path's math and a test oracle.

    Differentiable by ordinary autograd (so ``gradcheck`` applies). Computes in at least fp32
    and rounds once to the input dtype, like the kernel, in as few passes as torch allows:

    * fp32/fp64 (and any dtype with a float alpha): ``torch.lerp(host, seed, alpha)``, one pass:
      ``host + alpha*(seed - host)`` (``seed - (seed - host)*(1 - alpha)`` for alpha >= 0.5, so
      alpha = 0 and 1 give host and seed exactly). A float weight is an fp32 (opmath) scalar
      even for fp16/bf16 data. The kernel evaluates ``alpha*seed + (1-alpha)*host``: the same
      value to within an fp32 rounding for finite inputs. Where ``host`` is infinite they
      differ: lerp gives NaN for alpha < 0.5 (``inf + alpha*(seed - inf)``) where the kernel's
      sum gives the infinity, and both give NaN for alpha = 1 (``0 * inf``). A seeds' slot
      never blends a chunk that is the host's own (``kasmina.seeds.layer``).
    * fp16/bf16 with a tensor alpha: lerp would round the weight to the data's dtype, so the
      data is upcast, lerped in fp32 and rounded once. (The CPU op's forward,
      ``_blend_forward_reference``, does the same with one buffer fewer, and passes a CPU 0-d
      alpha as a scalar.)

    A per-chunk alpha ``[C]`` broadcasts over a ``[..., C, W]`` view of the inputs
    (``unflatten``), so no per-column alpha is materialised. An unknown ``mode`` is a
    ``ValueError``, as for the op.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "incubate":  # its ``jvp`` is not differentiated under an outer forward level
        no_nested_forward_mode("alpha_blend_reference")
        return _StraightThrough.apply(seed_out, host_out)
    host = host_out.detach()
    if not isinstance(alpha, Tensor):
        return torch.lerp(host, seed_out, float(alpha))
    dtype = seed_out.dtype
    work = _WORK.get(dtype, dtype)
    a = alpha if alpha.dtype == work else alpha.to(work)
    chunks = a.dim() == 1
    seed = seed_out
    if chunks:
        c = a.numel()
        seed, host, a = seed.unflatten(-1, (c, -1)), host.unflatten(-1, (c, -1)), a.unsqueeze(-1)
    if dtype == work:
        out = torch.lerp(host, seed, a)
    else:  # lerp would round a tensor weight to fp16/bf16: upcast the data instead
        out = torch.lerp(host.to(work), seed.to(work), a).to(dtype)
    return out.flatten(-2) if chunks else out


def _blend_forward_reference(
    seed: Tensor, host: Tensor, alpha: Tensor | None, alpha_value: float
) -> Tensor:
    """The CPU forward (no autograd here): the reference's math in the fewest passes.

    A CPU 0-d alpha is an fp32 scalar: one lerp. fp32 data lerps against the tensor alpha (a
    ``[C, 1]`` weight for per-chunk) in one op. fp16/bf16 data with a tensor alpha is upcast,
    and the host's fp32 copy is lerped in place (``lerp_``), then rounded once: the reference
    cannot reuse that buffer, because autograd would need the overwritten value.

    The result is never a view: ``_AlphaBlendFunction`` returns it, and autograd forbids
    modifying in place (``relu_`` after the slot) a Function's output that is a view of one of
    its temporaries. A per-chunk blend writes through ``[..., C, W]`` views into an output
    made in the final shape, rather than flattening its result.
    """
    scalar = _cpu_scalar(alpha, alpha_value)
    if scalar is not None:
        return torch.lerp(host, seed, scalar)
    assert alpha is not None
    dtype = seed.dtype
    work = _WORK.get(dtype, dtype)
    a = alpha if alpha.dtype == work else alpha.to(work)
    if a.dim() == 0:
        if work == dtype:
            return torch.lerp(host, seed, a)
        return host.to(work).lerp_(seed.to(work), a).to(dtype)
    c = a.numel()
    out = torch.empty_like(host)
    h, s, o = host.unflatten(-1, (c, -1)), seed.unflatten(-1, (c, -1)), out.unflatten(-1, (c, -1))
    if work == dtype and torch.jit.is_tracing():  # a trace replays ``out=`` even with grad,
        return torch.lerp(h, s, a.unsqueeze(-1)).flatten(-2)  # which ``out=`` refuses
    if work == dtype:
        torch.lerp(h, s, a.unsqueeze(-1), out=o)
    else:  # the copy rounds once, as ``.to(dtype)`` would
        o.copy_(h.to(work).lerp_(s.to(work), a.unsqueeze(-1)))
    return out


def _blend_backward_reference(
    grad: Tensor, seed: Tensor | None, host: Tensor | None, alpha: Tensor | None, alpha_value: float
) -> tuple[Tensor, Tensor]:
    """Gradients of ``blend`` for the CPU path: ``(alpha*g, sum(g*(seed-host)) or empty)``.

    fp32 math and one rounding, as in the kernel: a scalar alpha multiplies as an fp32 scalar;
    a tensor alpha next to fp16/bf16 data is a 1-d fp32 tensor, which makes the multiply
    upcast on the fly. A scalar alpha's gradient is one ``dot`` over ``seed - host`` (formed
    first, so that seed ~ host loses nothing to cancellation), in fp32.
    """
    dtype = grad.dtype
    work = _WORK.get(dtype, dtype)
    scalar = _cpu_scalar(alpha, alpha_value)
    if scalar is not None:
        grad_seed = grad * scalar
    else:
        assert alpha is not None
        a = alpha if alpha.dtype == work else alpha.to(work)
        if a.dim() == 1:
            g = grad.unflatten(-1, (a.numel(), -1)) * a.unsqueeze(-1)
            grad_seed = (g if dtype == work else g.to(dtype)).flatten(-2)
        elif dtype == work:
            grad_seed = grad * a
        else:  # as in the forward: upcast rather than round a 0-d fp32 alpha
            grad_seed = (grad.to(work) * a).to(dtype)
    if seed is None or host is None or alpha is None:
        return grad_seed, grad.new_empty(0)
    if dtype == work:
        g, diff = grad, seed - host
    else:
        g, diff = grad.to(work), seed.to(work) - host.to(work)
    if alpha.dim() == 0:
        grad_alpha = torch.dot(g.flatten(), diff.flatten())
    else:
        prod = diff.mul_(g).unflatten(-1, (alpha.numel(), -1))
        grad_alpha = prod.flatten(0, -3).sum(dim=(0, 2)) if prod.dim() > 2 else prod.sum(dim=1)
    return grad_seed, grad_alpha if grad_alpha.dtype == alpha.dtype else grad_alpha.to(alpha.dtype)


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
    return _blend_forward_reference(seed, host, alpha, alpha_value)


def _backward_impl(
    grad: Tensor, seed: Tensor | None, host: Tensor | None, alpha: Tensor | None, alpha_value: float
) -> tuple[Tensor, Tensor]:
    """``(grad_seed, grad_alpha)``; ``grad_alpha`` is empty unless seed and host are given."""
    grad = grad.contiguous()
    if use_triton(grad.device):
        return _kernels().blend_backward(grad, seed, host, alpha, alpha_value)
    return _blend_backward_reference(grad, seed, host, alpha, alpha_value)


def blend_chunks(seed: Tensor, host: Tensor, alpha: Tensor) -> Tensor:
    """``blend``'s value alone, chunk ``k`` of the last dim (``alpha.numel()`` equal chunks)
    using ``alpha[k]``, with no autograd (call it where grad mode is off) and no argument
    checks, for an autograd node that owns the backward (the seeds' guarded graft in
    ``kasmina.seeds.island``). The math and backend of :func:`alpha_blend`: on the CPU,
    fp32/fp64 data is one ``lerp`` against ``alpha[:, None]`` (the reference's own op); anything
    else goes through the op's forward.

    ``seed`` must be the caller's own scratch buffer: the CPU ``lerp`` writes over it, through
    its ``[..., C, W]`` view, and returns it (no new buffer, and the layout of ``seed``); the
    other paths return a new tensor, or ``seed`` with the result written into it when ``seed``
    is not contiguous (a slot's buffer in the host's layout, seen with the chunk dim moved
    last), so that the layout is the same on every path. Either way the result is not a view,
    so that the node may return it and its caller modify it in place (autograd forbids that on
    a Function's output that is a view of one of its temporaries, such as a blend flattened
    from ``[..., C, W]``)."""
    if seed.dtype not in _WORK and not use_triton(seed.device):
        c = alpha.numel()
        a = alpha if alpha.dtype == seed.dtype else alpha.to(seed.dtype)
        s = seed.unflatten(-1, (c, -1))
        torch.lerp(host.unflatten(-1, (c, -1)), s, a.unsqueeze(-1), out=s)  # elementwise
        return seed
    out = _forward_impl(seed.contiguous(), host.contiguous(), alpha.contiguous(), 0.0, "blend")
    return out if seed.is_contiguous() else seed.copy_(out)  # the layout of ``seed``


def blend_chunks_seed_grad(grad: Tensor, alpha: Tensor) -> Tensor:
    """``blend``'s gradient for the seed (``alpha[k] * g`` on chunk ``k``) on a ``[..., C, W]``
    view, the partner of :func:`blend_chunks`. In grad mode (a backward under
    ``create_graph=True``) it is torch ops, differentiable in ``grad`` and ``alpha``, as in
    ``_blend_backward_graph``; the kernel records no graph."""
    if torch.is_grad_enabled():
        work = _WORK.get(grad.dtype, grad.dtype)
        return (grad * alpha.to(work).unsqueeze(-1)).to(grad.dtype)
    if grad.dtype not in _WORK and not use_triton(grad.device):
        a = alpha if alpha.dtype == grad.dtype else alpha.to(grad.dtype)
        return grad * a.unsqueeze(-1)
    flat = _backward_impl(grad.flatten(-2), None, None, alpha.contiguous(), 0.0)[0]
    return flat.unflatten(-1, grad.shape[-2:])


def _save(ctx, seed: Tensor, host: Tensor, alpha: Tensor | None, alpha_value: float, mode: str):
    """Keep seed and host only when alpha needs a gradient; blend needs nothing else (copied
    out of inference mode, ``saveable``: an alpha made under it would be refused)."""
    ctx.mode = mode
    ctx.alpha_value = alpha_value
    ctx.alpha_needs_grad = mode == "blend" and alpha is not None and ctx.needs_input_grad[2]
    if ctx.alpha_needs_grad:
        ctx.save_for_backward(saveable(seed), saveable(host), saveable(alpha))
    else:
        ctx.save_for_backward(saveable(alpha))


def _jvp(ctx, t_seed, t_host, t_alpha, *_unused) -> Tensor | None:
    """The Function's forward-mode rule: the transpose of its backward (``_grads``)."""
    if ctx.mode == "incubate":  # straight-through: g to both, so t_seed + t_host
        return tangent_sum(t_seed, t_host)
    seed, host, alpha = ctx.saved_tensors
    return blend_tangent(seed, host, alpha, ctx.alpha_value, t_seed, t_alpha)


def _blend_backward_graph(
    grad: Tensor, seed: Tensor | None, host: Tensor | None, alpha: Tensor | None, alpha_value: float
) -> tuple[Tensor, Tensor]:
    """``_backward_impl``'s gradients as differentiable torch ops, for a backward that is itself
    differentiated (``create_graph=True``, e.g. a gradient penalty).

    ``alpha*g`` is linear in ``g`` and in ``alpha``, ``sum(g*(seed - host))`` linear in ``g``
    and in ``seed``, so autograd of these ops is the exact second derivative. The kernels record
    no graph, and the CPU path reads a 0-d alpha as a float: both would drop terms of it. The
    values are the reference path's: fp32 math (the data's own dtype for fp32/fp64), one
    rounding to the data's dtype, the host detached (it gets no gradient at any order).
    """
    dtype = grad.dtype
    work = _WORK.get(dtype, dtype)
    if alpha is None:
        grad_seed = grad * alpha_value  # an fp32 (opmath) scalar, rounded once
    else:
        a = alpha.to(work)
        if a.dim() == 1:  # fp16/bf16 times the fp32 alpha is promoted to fp32
            g = grad.unflatten(-1, (a.numel(), -1)) * a.unsqueeze(-1)
            grad_seed = g.to(dtype).flatten(-2)
        else:
            grad_seed = (grad.to(work) * a).to(dtype)
    if seed is None or host is None or alpha is None:
        return grad_seed, grad.new_empty(0)
    prod = grad.to(work) * (seed.to(work) - host.detach().to(work))
    if alpha.dim() == 0:
        grad_alpha = prod.sum()
    else:
        c = alpha.numel()
        grad_alpha = prod.unflatten(-1, (c, -1)).sum(-1).reshape(-1, c).sum(0)
    return grad_seed, grad_alpha.to(alpha.dtype)


def _grads(ctx, grad: Tensor, backward_fn) -> tuple[Tensor | None, ...]:
    """Both wrappers' backward. Grad mode is on inside a backward only under
    ``create_graph=True``: then the gradients are differentiable ops (``_blend_backward_graph``),
    else ``backward_fn`` (the kernels, or the CPU path)."""
    if ctx.mode == "incubate":
        return grad, grad, None, None, None
    if ctx.alpha_needs_grad:
        seed, host, alpha = ctx.saved_tensors
    else:
        (alpha,) = ctx.saved_tensors
        seed = host = None
    if torch.is_grad_enabled():
        backward_fn = _blend_backward_graph
    grad_seed, grad_alpha = backward_fn(grad, seed, host, alpha, ctx.alpha_value)
    return grad_seed, None, (grad_alpha if ctx.alpha_needs_grad else None), None, None


class _AlphaBlendFunction(torch.autograd.Function):
    """Eager path, in the ``setup_context`` form (``forward`` takes no ``ctx``), which
    ``torch.func.grad`` needs: it runs the forward on the plain tensors. Its backward is then
    in grad mode (the transform's ``create_graph``), so it takes ``_blend_backward_graph``'s
    torch ops, on either backend; ``vmap`` is refused. Forward mode (``torch.func.jvp``,
    ``jacfwd``, ``forward_ad``) takes ``_jvp``, in torch ops; one level only (``alpha_blend``)."""

    @staticmethod
    def forward(seed, host, alpha, alpha_value, mode):  # type: ignore[override]
        return _forward_impl(seed, host, alpha, alpha_value, mode)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _save(ctx, *inputs)
        # What ``blend``'s ``_jvp`` needs, only while a dual level is open (``forward_ad``;
        # ``torch.func.jvp``/``jacfwd`` open one): else seed and host would outlive the forward.
        if _forward_ad._current_level >= 0 and inputs[4] == "blend":
            ctx.save_for_forward(*inputs[:3])

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _grads(ctx, grad, _backward_impl)

    jvp = staticmethod(_jvp)
    vmap = no_vmap("alpha_blend")


@torch.library.custom_op("kasmina::alpha_blend", mutates_args=())
def _alpha_blend_op(
    seed: Tensor, host: Tensor, alpha: Tensor | None, alpha_value: float, mode: str
) -> Tensor:
    # Compiled, an input may arrive with other strides than it was traced with: the caller's
    # ``.contiguous()`` ran on a fake tensor that was contiguous where the real one (a
    # channels_last slot's pre-blend, built of 1-channel chunks) is not. The kernels take
    # contiguous rows; a contiguous input is not copied.
    args = (seed.contiguous(), host.contiguous(), _contiguous(alpha))
    return _forward_impl(*args, alpha_value, mode)


def _contiguous(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.contiguous()


@_alpha_blend_op.register_fake
def _alpha_blend_fake(seed, host, alpha, alpha_value, mode):
    return torch.empty_like(host, memory_format=torch.contiguous_format)  # as the op's output


@torch.library.custom_op("kasmina::alpha_blend_backward", mutates_args=())
def _alpha_blend_backward_op(
    grad: Tensor, seed: Tensor | None, host: Tensor | None, alpha: Tensor | None, alpha_value: float
) -> tuple[Tensor, Tensor]:
    seed, host, alpha = _contiguous(seed), _contiguous(host), _contiguous(alpha)  # as above
    return _backward_impl(grad, seed, host, alpha, alpha_value)


@_alpha_blend_backward_op.register_fake
def _alpha_blend_backward_fake(grad, seed, host, alpha, alpha_value):
    wants_alpha = seed is not None and host is not None and alpha is not None
    grad_alpha = torch.empty_like(alpha) if wants_alpha else grad.new_empty(0)
    # Contiguous, as _backward_impl returns it whatever the incoming gradient's strides.
    return torch.empty_like(grad, memory_format=torch.contiguous_format), grad_alpha


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
    if not isinstance(alpha, Tensor):
        value = check_real("alpha", alpha)  # a bool, a string, None: "alpha must be a float"
        # The kernel's fp32 argument: inf, NaN, 1e39 refused; an int compared exactly (float()
        # of 10**400 raised OverflowError)
        if not abs(value) <= _FP32_MAX:
            raise ValueError(f"alpha must be a finite number in fp32's range, got {alpha!r:.40}")
    else:
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
    elif torch.compiler.is_compiling():
        alpha_t, alpha_value = traced_scalar(alpha, torch.float32, seed_out.device), 0.0
    else:
        alpha_t, alpha_value = None, float(alpha)
    # blend detaches the host (no gradient): only the seed's or alpha's grad makes a node.
    host = host_out.contiguous() if mode == "incubate" else host_out.detach().contiguous()
    args = (seed_out.contiguous(), host, alpha_t, alpha_value, mode)
    if in_compiled_transform():
        return _blend_in_torch_ops(seed_out, host_out, alpha, mode)
    if functorch_active():
        no_nested_forward_mode("alpha_blend")  # ``grad`` over one ``jvp`` is exact: linear rule
        return _AlphaBlendFunction.apply(*args)  # torch.func: its forward gets plain tensors
    if through_dispatcher():  # tracing, or a mode that fakes tensors (FakeTensorMode, ...)
        return _alpha_blend_op(*args)
    alpha_grad = alpha_t is not None and alpha_t.requires_grad
    # A forward-AD level open: the Function, whose ``jvp`` carries the tangents (the kernel
    # drops them, as ``_native_blend`` does: it reads a 0-d alpha as a float).
    if _forward_ad._current_level >= 0:
        return _AlphaBlendFunction.apply(*args)
    if not torch.is_grad_enabled() or not (
        seed_out.requires_grad or host.requires_grad or alpha_grad
    ):
        return _forward_impl(*args)  # no graph to record
    if (
        mode == "blend"
        and (seed_out.requires_grad or alpha_grad)
        and not use_triton(seed_out.device)
    ):
        out = _native_blend(*args[:4])
        if out is not None:
            return out
    return _AlphaBlendFunction.apply(*args)


def _blend_in_torch_ops(
    seed_out: Tensor, host_out: Tensor, alpha: Tensor | float, mode: str
) -> Tensor:
    """``alpha_blend`` inside a compiled ``torch.func`` transform, where neither the custom op
    (its autograd formula has no functorch rule) nor an ``autograd.Function`` serves: the
    transform traced over ``_StraightThrough`` gave the seed a zero gradient. ``blend`` is the
    reference's ``lerp``; ``incubate`` is ``host - d`` for ``d = seed.detach() - seed``, 0 and
    so exactly ``host``, with the gradient ``g`` to both; where the seed is not finite ``d`` is
    replaced by 0 (the value is the host's; that element's seed gradient 0, not ``g``)."""
    if mode == "incubate":
        d = seed_out.detach() - seed_out
        return host_out - d.where(d == d, 0.0)
    return alpha_blend_reference(seed_out, host_out, alpha, mode)


def _native_blend(
    seed: Tensor, host: Tensor, alpha: Tensor | None, alpha_value: float
) -> Tensor | None:
    """The CPU path with a graph, as plain differentiable torch ops where that saves no more.

    Autograd then runs in C++ (a Python ``autograd.Function`` costs more per call than the
    blend of a small activation) and the gradients are the contract's: ``lerp``'s ``alpha*g``
    for the seed and ``sum(g*(seed - host))`` for a tensor alpha; the host is detached. Used
    only where lerp's graph keeps what the Function would: a scalar alpha (a float, or a CPU 0-d
    tensor without grad) saves no activation, and a tensor alpha that needs a gradient on
    fp32 data saves seed and host, as the Function must. The rest (fp16/bf16 with a tensor
    alpha, whose graph would keep fp32 copies; a per-chunk alpha without grad) returns None.
    """
    if alpha is None or (alpha.dim() == 0 and alpha.is_cpu and not alpha.requires_grad):
        return torch.lerp(host.detach(), seed, alpha_value if alpha is None else float(alpha))
    if alpha.requires_grad and seed.dtype not in _WORK:  # lerp saves the host: ``saveable``
        return alpha_blend_reference(seed, saveable(host), alpha)
    return None


def seed_blend(
    seed_out: Tensor, host_out: Tensor, alpha: Tensor | float, mode: str = "blend"
) -> Tensor:
    """``alpha_blend`` in any float dtype a host runs in, for the seeds' slots: the fused op for
    fp32/fp16/bf16 data, and for fp64 (a model converted with ``.double()``, a ``gradcheck`` of
    a grown model) ``alpha_blend_reference``, the same math in plain torch, which autograd
    differentiates (the kernels take 16- and 32-bit floats only)."""
    if isinstance(seed_out, Tensor) and seed_out.dtype == torch.float64:
        return alpha_blend_reference(seed_out, host_out, alpha, mode)
    return alpha_blend(seed_out, host_out, alpha, mode)
