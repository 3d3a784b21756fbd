"""The eager ``torch.autograd.Function``s' support for higher order and ``torch.func``.

``first_order_backward``: a backward that records no graph is differentiable once; a second backward
through its gradients raises instead of being silently wrong (``kd_kl_loss`` and
``fused_linear_kd_loss``). Under ``torch.func`` (``kd_kl_loss`` and ``alpha_blend``; the
fused-linear op's Function is not in this form and is not supported there): the Functions take the
``setup_context`` form (a ``forward`` without ``ctx``), so ``torch.func.grad``/``vjp`` run their
forward on the plain tensors; such a backward is run one level down, on the plain tensors too (the
kernels need storage); for ``kd_kl_loss``, whose backward records no graph, nested transforms
and any ``vmap`` raise a clear error naming the op (``functorch_backward``); ``alpha_blend``'s
backward is linear in the incoming gradient, in plain torch ops there, so ``jacrev`` and nested
``grad`` compose and only ``vmap`` over its inputs raises (``no_vmap``); forward mode nested in
forward mode raises for both (``no_nested_forward_mode``), since its
``jvp`` rule torch does not differentiate. ``functorch_active``
routes the ops' eager shortcuts (no graph to record) through their Functions while a transform
runs. ``plain_flag`` and
``outside_transforms`` let a forward run under a transform (a grown model under
``torch.func.grad``) update its device flags, which live outside it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "first_order_backward",
    "functorch_active",
    "functorch_context",
    "graph_anchor",
    "in_compiled_transform",
    "no_nested_forward_mode",
    "no_vmap",
    "outside_transforms",
    "plain_flag",
    "reduced_to_level_of",
    "tie_once",
    "transform_depth",
    "transform_wrapped",
    "under_vmap",
]


# functorch's interpreter stack (private; a torch without it runs no transform we can see).
_FUNCTORCH = getattr(torch._C, "_functorch", None)
_PEEK = getattr(_FUNCTORCH, "peek_interpreter_stack", None)
_INTERPRETER = getattr(_FUNCTORCH, "CInterpreter", None)


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vjp``, ``vmap``, ...) is running. The
    ops' eager shortcuts call kernels that need real storage, so under a transform every call
    goes through the op's ``torch.autograd.Function``, which ``torch.func`` unwraps. Traced by
    TorchDynamo too, where the stack is read as a constant at trace time: tested by type, as an
    ``is not None`` there is true of the constant None as well."""
    return _PEEK is not None and _INTERPRETER is not None and isinstance(_PEEK(), _INTERPRETER)


def in_compiled_transform() -> bool:
    """Whether TorchDynamo is tracing a ``torch.func`` transform (``torch.compile`` of a
    ``grad``): there neither the ops' custom ops (no ``torch.func`` rule) nor their Functions
    serve, so the ops run as plain torch ops; and a test of a tensor's mode, or a graph node's
    metadata, cannot be read."""
    return torch.compiler.is_compiling() and functorch_active()


def transform_depth() -> int:
    """How many ``torch.func`` transforms run the forward running now. Compiled, 1 for any:
    the interpreters cannot be listed in a trace, and 0 there made a compiled transform's
    forward take teacher logits set outside it for the next training forward (its KD loss, a
    batched tensor, escaped the transform and failed that step's collect)."""
    if not functorch_active():
        return 0
    if torch.compiler.is_compiling():
        return 1
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return len(retrieve_all_functorch_interpreters())


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` (perhaps around other transforms) runs the eager forward
    running now: ``kd_kl_loss`` refuses it (``grad`` and ``vjp`` it takes)."""
    if torch.compiler.is_compiling() or not functorch_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def no_nested_forward_mode(op: str, *, reverse: bool = False) -> None:
    """Raise (``RuntimeError`` naming ``op``) where ``torch.func`` nests forward mode around the
    op: more than one ``jvp`` level (``jvp`` of ``jvp``, ``jacfwd(jacfwd)``, ``hessian``'s
    kind), or, with ``reverse``, a ``grad``/``vjp`` level beside a ``jvp`` one. PyTorch runs a
    Function's ``jvp`` rule below the outer levels and does not differentiate it there, so
    their second-order terms would be silently missing. ``jacfwd`` alone (a ``vmap`` around
    one ``jvp``) passes; eager forward mode has a single dual level."""
    if torch.compiler.is_compiling() or not functorch_active():
        return
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    keys = [i.key() for i in retrieve_all_functorch_interpreters()]
    jvps = keys.count(TransformType.Jvp)
    if jvps > 1 or (reverse and jvps and TransformType.Grad in keys):
        raise RuntimeError(
            f"{op} supports a single forward-mode transform (torch.func.jvp or jacfwd), not "
            f"nested ones{' nor one beside grad or vjp' if reverse else ''}: its jvp rule is "
            f"not differentiated again (active: {[k.name for k in keys]})"
        )


def plain_flag(t: Tensor, reduce) -> Tensor:
    """``t``, a bool tensor computed under ``torch.func`` transforms, as the plain tensor under
    their wrappers, reduced by ``reduce`` (``torch.all``, ``torch.any``) over each ``vmap``'s
    batch dim: a value a tensor outside the transforms may take (``outside_transforms``)."""
    return _unwrapped_above(t, reduce, -1)


def reduced_to_level_of(t: Tensor, like: Tensor, reduce) -> Tensor:
    """``t``, a bool tensor computed under ``torch.func`` transforms, reduced by ``reduce`` over
    the batch of every ``vmap`` inside the innermost one that batches ``like`` (a tensor the
    transformed function was given): a value ``like`` may take in place (``plain_flag`` for all
    levels). A ``grad`` wrapping ``like`` (its buffers lifted, in a per-sample ``grad`` inside
    an ensemble's ``vmap``) is no batch: an in-place update lifts the other operand there."""
    from torch._C._functorch import (
        get_unwrapped,
        is_batchedtensor,
        is_functorch_wrapped_tensor,
        maybe_get_level,
    )

    level = -1
    while is_functorch_wrapped_tensor(like):
        if is_batchedtensor(like):
            level = maybe_get_level(like)
            break
        like = get_unwrapped(like)
    return _unwrapped_above(t, reduce, level)


def _unwrapped_above(t: Tensor, reduce, level: int) -> Tensor:
    """``t`` with its transform wrappers above ``level`` taken off, each ``vmap``'s batch dim
    reduced by ``reduce``."""
    from torch._C._functorch import (
        _unwrap_batched,
        get_unwrapped,
        is_batchedtensor,
        is_functorch_wrapped_tensor,
        maybe_get_level,
    )

    while is_functorch_wrapped_tensor(t) and maybe_get_level(t) > level:
        if is_batchedtensor(t):
            t, dim = _unwrap_batched(t, maybe_get_level(t))
            t = t if dim is None else reduce(t, dim=dim)
        else:
            t = get_unwrapped(t)
    return t


def transform_wrapped(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` transform's wrapper (a tensor the transformed function
    was given, such as a buffer ``functional_call`` put in place of a module's own)."""
    from torch._C._functorch import is_functorch_wrapped_tensor

    return is_functorch_wrapped_tensor(t)


def outside_transforms():
    """A context in which no ``torch.func`` transform runs: an in-place update there of a tensor
    the transformed function did not create (a device flag) is not one the transform refuses."""
    from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

    return temporarily_clear_interpreter_stack()


def no_vmap(op: str):
    """A ``vmap`` staticmethod for an op's Function: a refusal (``RuntimeError``, as torch
    gives for a Function without a vmap rule), by design and not a gap. The kernels address whole
    rows through pointers and strides, which a batched tensor (no storage of its own) lacks,
    and a per-sample loop would hide a slow path; the ops batch over leading dims already."""

    def vmap(info, in_dims, *args):
        raise RuntimeError(
            f"{op} does not support torch.vmap: its kernels need tensors with storage; "
            "call it on the batched tensors directly"
        )

    return staticmethod(vmap)


def functorch_context(ctx, op: str) -> None:
    """Record on ``ctx`` (in ``setup_context``) the op's name and whether a ``torch.func``
    transform applies the Function: its saved tensors are then the transform's wrappers, also
    when the backward runs after the transform has returned (``vjp``'s function)."""
    ctx.op, ctx.functorch = op, functorch_active()


class _PlainCtx:
    """``ctx`` with ``saved_tensors`` replaced by the plain tensors under the wrappers; every
    other attribute (read or written) is ``ctx``'s own."""

    def __init__(self, ctx, saved: tuple) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", saved)

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._ctx, name, value)


def functorch_backward(op: str, backward, ctx, grads: tuple):
    """``backward(ctx, *grads)`` under ``torch.func.grad``/``vjp``, one level down: the saved
    tensors and the incoming gradients unwrapped, and new tensors (the gradients, scratch)
    made plain, so that the kernels can read and write their storage. Only a single grad
    transform is supported: the backward records no graph, so a nested one (``grad(grad(f))``,
    ``jacrev``, ``vmap`` over the gradient) would get silently wrong (zero) second-order
    terms, and a batched tensor cannot reach the kernels; those raise."""
    from torch._C._functorch import TransformType, get_unwrapped, is_functorch_wrapped_tensor
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    stack = retrieve_all_functorch_interpreters()  # empty in vjp's function
    if len(stack) > 1 or (stack and stack[0].key() != TransformType.Grad):
        raise RuntimeError(
            f"{op} is differentiable once and supports a single torch.func.grad or vjp only, "
            f"not nested transforms, vmap or jacrev (active: {[i.key().name for i in stack]})"
        )

    def plain(t):
        while isinstance(t, Tensor) and is_functorch_wrapped_tensor(t):
            t = get_unwrapped(t)
        return t

    with stack[0].lower() if stack else contextlib.nullcontext(), torch.no_grad():
        saved = tuple(plain(t) for t in ctx.saved_tensors)
        return backward(_PlainCtx(ctx, saved), *(plain(g) for g in grads))


def first_order_backward(backward):
    """``torch.autograd.function.once_differentiable`` for a backward whose gradients depend
    on its saved inputs, not only on the incoming gradient; ``setup_context`` calls
    ``functorch_context`` first.

    Such a backward (``kd_kl_loss``'s, the fused-linear op's) scales a gradient it recomputes
    or stored; it records no graph, so a second derivative through it would be silently wrong
    (the softmax's own second-order term missing). ``once_differentiable`` raises on that
    second backward only when an incoming gradient requires grad, which ``grad_output = 1``
    of ``autograd.grad(loss, x, create_graph=True)`` does not, although the student does.
    So under ``create_graph=True`` (grad mode on inside the backward) the incoming gradients
    are marked as requiring grad first, and each gradient returned is tied, through an identity
    node whose backward raises, to the saved tensors that require grad (the op's inputs, or a
    0-element anchor on the student's graph: ``graph_anchor``): the first-order gradients keep
    their values, and a second derivative through them raises, whether by ``backward()`` or by
    ``autograd.grad`` of named inputs (which prunes a node hanging off the incoming gradient
    alone and would otherwise return a silently incomplete result, or None). The tie is no
    view (a caller may scale the gradient in place); like any ``backward(create_graph=True)``
    it makes a leaf's ``.grad`` reach the leaf's graph (PyTorch's own warning about that
    reference cycle applies). The anchor costs two 0-element ops per CPU call that needs a
    gradient.
    A backward of a Function applied under ``torch.func`` runs through ``functorch_backward``
    (which refuses nesting: functorch forbids ``requires_grad_`` inside a transform)."""
    once = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if getattr(ctx, "functorch", False):
            return functorch_backward(ctx.op, backward, ctx, grads)
        if not torch.is_grad_enabled():
            return once(ctx, *grads)
        grads = tuple(
            g.detach().requires_grad_() if isinstance(g, Tensor) and not g.requires_grad else g
            for g in grads
        )
        out = once(ctx, *grads)
        ties = [t for t in ctx.saved_tensors if isinstance(t, Tensor) and t.requires_grad]
        if not ties:
            return out
        op = getattr(ctx, "op", backward.__qualname__)
        tie = _DifferentiableOnce.apply
        if isinstance(out, Tensor):
            return tie(op, out, *ties)
        return tuple(tie(op, g, *ties) if isinstance(g, Tensor) else g for g in out)

    return wrapper


class _DifferentiableOnce(torch.autograd.Function):
    """Identity on a first-order gradient, with the op's inputs as inputs: a second derivative
    through the gradient reaches this node (the path to the inputs runs through it) and
    raises, where without it the op's own second-order term would be silently missing."""

    @staticmethod
    def forward(ctx, op: str, grad: Tensor, *_inputs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.op = op
        return grad.detach()  # not a view: the caller may modify the gradient in place

    @staticmethod
    def backward(ctx, *_grads: Tensor):  # type: ignore[override]
        raise RuntimeError(
            f"{ctx.op} is differentiable once: trying to differentiate twice through its "
            "gradients (create_graph=True, then a gradient penalty or a Hessian) or its "
            "forward-mode tangent (a backward through a jvp)"
        )


def tie_once(op: str, value: Tensor, ties: tuple) -> Tensor:
    """``value`` detached, tied (``_DifferentiableOnce``) to those of ``ties`` that require
    grad, in grad mode: a forward-mode rule's term that holds the op's inputs (``kd_kl_loss``'s
    ``p_s - p_t``) but records none of their graph. A backward through the tangent then raises
    naming the op, where it would be silently wrong or fail with a generic error."""
    ties = tuple(t for t in ties if isinstance(t, Tensor) and t.requires_grad)
    if not ties or not torch.is_grad_enabled() or functorch_active():
        return value.detach()
    return _DifferentiableOnce.apply(op, value.detach(), *ties)


def graph_anchor(t: Tensor) -> Tensor:
    """A 0-element tensor on ``t``'s autograd graph that holds none of ``t``'s memory (a clone
    of an empty view): saved by a backward that does not save ``t`` itself, so that
    ``first_order_backward`` can tie its gradients to ``t``'s graph."""
    return t.as_strided((0,), (1,)).clone()
