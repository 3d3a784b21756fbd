"""alpha_blend beyond first-order reverse mode, on both backends: a gradient penalty (a second
backward) against float64 autograd, ``blend_chunks_seed_grad`` differentiable in grad mode,
``torch.func.grad`` (also compiled), ``jacrev`` and ``grad`` of ``grad``, forward mode
(``jvp``, ``forward_ad``, ``jacfwd``) against the float64 reference, and nested forward mode
refused naming the op."""

from __future__ import annotations

import zlib

import pytest
import torch

from kasmina.ops import alpha_blend, alpha_blend_reference
from kasmina.ops.alpha_blend import blend_chunks_seed_grad
from tests.ops.alpha_blend_helpers import ALPHA_KINDS, _alpha, _alpha64, _inputs
from tests.ops.tolerances import DTYPES, tol


def _penalty(x, w, host, alpha, blend):
    """A gradient penalty: the squared gradients of ``sum(blend(tanh(x @ w), host, alpha)²)``
    for ``x`` (and a tensor ``alpha`` that requires grad), taken with ``create_graph=True``."""
    out = blend(torch.tanh(x @ w), host, alpha)
    wrt = (x, alpha) if isinstance(alpha, torch.Tensor) and alpha.requires_grad else (x,)
    grads = torch.autograd.grad(out.pow(2).sum(), wrt, create_graph=True)
    return sum(g.pow(2).sum() for g in grads)


@pytest.mark.parametrize(
    ("kind", "alpha_grad"),
    [("float", False), ("0-d", False), ("0-d", True), ("chunks", False), ("chunks", True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("call", ["public", "custom-op"])
def test_gradient_penalty_matches_float64_autograd(
    backend: str, call: str, dtype: torch.dtype, kind: str, alpha_grad: bool
) -> None:
    """A second backward through the op's backward (docs/design.md §6a: a gradient penalty
    through guarded seeds) against float64 autograd of the plain blend, eager and through the
    custom op torch.compile uses (called eagerly): the kernels record no graph, so under
    ``create_graph=True`` the backward is differentiable torch ops. (fp16 data with a tensor
    alpha takes the Function on the CPU path too; bf16's own rounding of the matmul and tanh
    around the op is above any tolerance that would still catch a missing term.)"""
    gen = torch.Generator().manual_seed(62)
    x0 = torch.randn(4, 6, generator=gen).to(dtype)
    w0 = (torch.randn(6, 12, generator=gen) * 0.5).to(dtype)
    host0 = torch.randn(4, 12, generator=gen).to(dtype)
    alpha0 = _alpha(kind, 12, seed=62)

    def leaves(dt):
        x, w = (t.detach().to(dt).requires_grad_(True) for t in (x0, w0))
        a = alpha0
        if isinstance(a, torch.Tensor):
            a = a.detach().to(dt if dt == torch.float64 else a.dtype).requires_grad_(alpha_grad)
        return x, w, a

    x, w, a = leaves(dtype)
    host = host0.clone().requires_grad_(True)  # gets no gradient, at any order

    def op(seed, h, alpha):
        if isinstance(alpha, torch.Tensor):
            return torch.ops.kasmina.alpha_blend(seed, h, alpha, 0.0, "blend")
        return torch.ops.kasmina.alpha_blend(seed, h, None, alpha, "blend")

    _penalty(x, w, host, a, alpha_blend if call == "public" else op).backward()

    x64, w64, a64 = leaves(torch.float64)

    def blend64(seed, h, alpha):
        col = _alpha64(alpha, seed.shape[-1])
        return col * seed + (1 - col) * h.detach()

    _penalty(x64, w64, host0.double(), a64, blend64).backward()
    assert host.grad is None
    got = [x.grad, w.grad, *([a.grad] if alpha_grad else [])]
    want = [x64.grad, w64.grad, *([a64.grad] if alpha_grad else [])]
    for g, e in zip(got, want, strict=True):
        assert g is not None and g.shape == e.shape
        t = tol(dtype)
        torch.testing.assert_close(g.double(), e, rtol=t["rtol"], atol=t["atol"] * e.abs().max())


def test_blend_chunks_seed_grad_is_differentiable_in_grad_mode(backend: str) -> None:
    """The seeds' guarded graft forms its seeds' gradient with ``blend_chunks_seed_grad``:
    inside a backward under ``create_graph=True`` (grad mode on) it is differentiable in the
    incoming gradient and in alpha, with the value it has without a graph."""
    gen = torch.Generator().manual_seed(63)
    grad = torch.randn(3, 4, 5, generator=gen, requires_grad=True)
    alpha = torch.rand(4, generator=gen, requires_grad=True)
    weights = torch.randn(3, 4, 5, generator=gen)
    with torch.no_grad():
        plain = blend_chunks_seed_grad(grad, alpha)
    out = blend_chunks_seed_grad(grad, alpha)
    assert torch.equal(out, plain)
    (out * weights).sum().backward()
    torch.testing.assert_close(grad.grad, alpha.detach()[:, None] * weights)
    torch.testing.assert_close(alpha.grad, (weights * grad.detach()).sum(dim=(0, 2)))


@pytest.mark.parametrize("alpha_kind", ALPHA_KINDS)
@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_torch_func_grad_matches_eager_autograd(backend, alpha_kind, mode):
    """``torch.func.grad`` over the seed, the host and a tensor alpha equals eager autograd
    (the float64 reference's) on both backends; ``vmap`` raises naming the op."""
    seed_out, host_out, grad = _inputs((2, 3, 8), torch.float32, seed=7)
    alpha = _alpha(alpha_kind, 8)
    a = alpha if isinstance(alpha, float) else alpha.clone()

    def f(s, h, al):
        return (alpha_blend(s, h, al if al is not None else a, mode) * grad).sum()

    tensor_alpha = not isinstance(alpha, float)
    argnums = (0, 1, 2) if tensor_alpha else (0, 1)
    got = torch.func.grad(f, argnums=argnums)(seed_out, host_out, a if tensor_alpha else None)
    leaves = [x.double().requires_grad_() for x in (seed_out, host_out)]
    if tensor_alpha:
        leaves.append(a.double().requires_grad_())
    al64 = leaves[2] if tensor_alpha else alpha
    out = alpha_blend_reference(leaves[0], leaves[1], al64, mode)
    want = torch.autograd.grad((out * grad.double()).sum(), leaves, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), torch.zeros_like(g.double()) if w is None else w)
    with pytest.raises(RuntimeError, match="alpha_blend does not support torch.vmap"):
        torch.vmap(lambda s, h: alpha_blend(s, h, 0.3, mode))(seed_out, host_out)


@pytest.mark.parametrize("alpha_kind", ["float", "chunks"])
@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_a_compiled_torch_func_grad_matches_eager(alpha_kind, mode):
    """Inside ``torch.compile`` of a ``torch.func`` transform neither the custom op (it has no
    ``torch.func`` rule: TorchDynamo raised) nor an ``autograd.Function`` serves (traced over
    ``incubate``'s straight-through Function, the transform gave the seed a zero gradient):
    plain torch ops there, the eager gradients and, for ``incubate``, exactly the host's value."""
    seed_out, host_out, grad = _inputs((2, 3, 8), torch.float32, seed=9)
    alpha = _alpha(alpha_kind, 8)

    def f(s, h):
        out = alpha_blend(s, h, alpha, mode)
        return (out * grad).sum(), out

    want, want_out = torch.func.grad(f, argnums=(0, 1), has_aux=True)(seed_out, host_out)
    torch._dynamo.reset()
    transform = torch.func.grad(f, argnums=(0, 1), has_aux=True)
    compiled = torch.compile(transform, fullgraph=True, backend="aot_eager")
    got, out = compiled(seed_out, host_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert bool(got[0].any())  # the seed's gradient is there
    torch.testing.assert_close(out, want_out)
    if mode == "incubate":  # exactly the host's value, a non-finite seed element's too
        assert torch.equal(out, host_out)
        seed_out[0, 0, :2] = torch.tensor([float("inf"), float("nan")])
        assert torch.equal(compiled(seed_out, host_out)[1], host_out)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_jacrev_and_nested_grad_equal_the_float64_reference(backend, mode) -> None:
    """The blend's backward is linear in the incoming gradient, in plain torch ops under a
    transform, so reverse mode composes: ``jacrev`` (``vmap`` over the backward: the op's own
    ``vmap`` refusal is for batched primals) and ``grad`` of ``grad``, over the seed, the host
    and a per-chunk alpha, equal the float64 reference's (the docs said they raised)."""
    gen = torch.Generator().manual_seed(31)
    seed, host = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    alpha = torch.rand(3, generator=gen)

    def op(s, h, a):
        return alpha_blend(s, h, a, mode)

    def ref(s, h, a):
        return alpha_blend_reference(s, h, a, mode)

    got = torch.func.jacrev(op, argnums=(0, 1, 2))(seed, host, alpha)
    want = torch.func.jacrev(ref, argnums=(0, 1, 2))(seed.double(), host.double(), alpha.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)

    def second(fn, s, h, a):  # d/d(alpha, seed) of the seed gradient of sum(out^2)
        inner = lambda s_, a_: torch.func.grad(lambda x: (fn(x, h, a_) ** 2).sum())(s_)  # noqa: E731
        return torch.func.grad(lambda s_, a_: inner(s_, a_).sum(), argnums=(0, 1))(s, a)

    got = second(op, seed, host, alpha)
    want = second(ref, seed.double(), host.double(), alpha.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)


def _tangent64(seed, host, alpha, mode, t_seed, t_host, t_alpha):
    """``torch.func.jvp`` of the float64 reference: the independent forward-mode oracle."""
    if isinstance(alpha, torch.Tensor):
        fn = lambda s, h, a: alpha_blend_reference(s, h, a, mode)  # noqa: E731
        args, tans = (seed, host, alpha), (t_seed, t_host, t_alpha)
    else:
        fn = lambda s, h: alpha_blend_reference(s, h, alpha, mode)  # noqa: E731
        args, tans = (seed, host), (t_seed, t_host)
    return torch.func.jvp(fn, tuple(a.double() for a in args), tuple(t.double() for t in tans))


@pytest.mark.parametrize("mode", ["blend", "incubate"])
@pytest.mark.parametrize("alpha_kind", ALPHA_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_mode_matches_the_float64_reference(backend, dtype, alpha_kind, mode) -> None:
    """Forward-mode AD was refused (``NotImplementedError``, a deliberate stub). Now
    ``torch.func.jvp`` and ``forward_ad`` (a dual seed with and without grad, which once
    skipped the Function and dropped the tangent) give the reference's float64 tangent:
    ``alpha*t_seed + t_alpha*(seed - host)`` per chunk for ``blend`` (the host's tangent adds
    nothing: it is detached), ``t_seed + t_host`` for ``incubate``."""
    import torch.autograd.forward_ad as fwad

    shape = (3, 7, 18)  # odd, and 18 divides into the 6 chunks of a per-chunk alpha
    seed, host, _ = _inputs(shape, dtype, seed=zlib.crc32(f"{dtype}{alpha_kind}{mode}".encode()))
    t_seed, t_host, _ = _inputs(shape, dtype, seed=7)
    alpha = _alpha(alpha_kind, shape[-1], seed=3)
    t_alpha = torch.randn_like(alpha) if isinstance(alpha, torch.Tensor) else None
    want_out, want = _tangent64(seed, host, alpha, mode, t_seed, t_host, t_alpha)
    if t_alpha is None:
        got_out, got = torch.func.jvp(
            lambda s, h: alpha_blend(s, h, alpha, mode), (seed, host), (t_seed, t_host)
        )
    else:
        got_out, got = torch.func.jvp(
            lambda s, h, a: alpha_blend(s, h, a, mode),
            (seed, host, alpha),
            (t_seed, t_host, t_alpha),
        )
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol(dtype))
    torch.testing.assert_close(got_out.double(), want_out, **tol(dtype))
    for requires_grad in (False, True):
        with fwad.dual_level():
            dual_seed = fwad.make_dual(seed.clone().requires_grad_(requires_grad), t_seed)
            dual_host = fwad.make_dual(host, t_host)
            a = alpha if t_alpha is None else fwad.make_dual(alpha, t_alpha)
            tangent = fwad.unpack_dual(alpha_blend(dual_seed, dual_host, a, mode)).tangent
        assert tangent is not None, requires_grad
        torch.testing.assert_close(tangent.double(), want, **tol(dtype))


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_jacfwd_equals_jacrev_on_small_inputs(backend, mode) -> None:
    """``jacfwd`` (``vmap`` over ``jvp``: the primals are not batched, so the op's ``vmap``
    refusal is not reached) equals autograd's reverse-mode Jacobian, for every input."""
    seed, host = torch.randn(2, 6), torch.randn(2, 6)
    alpha = torch.tensor([0.2, 0.7, 0.4])
    fn = lambda s, h, a: alpha_blend(s, h, a, mode)  # noqa: E731
    fwd = torch.func.jacfwd(fn, argnums=(0, 1, 2))(seed, host, alpha)
    rev = torch.autograd.functional.jacobian(fn, (seed, host, alpha))
    for f, r in zip(fwd, rev, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_nested_forward_mode_raises_naming_the_op(backend, mode) -> None:
    """PyTorch runs a Function's ``jvp`` rule below outer transforms without differentiating
    it, so ``jvp`` of ``jvp`` and ``jacfwd(jacfwd)`` returned silently wrong second-order terms
    (0 where ``alpha*tanh''`` belongs; refused with ``NotImplementedError`` before the op had
    a rule). Now they raise naming the op (and the reference's ``incubate``, for its own
    Function's rule), while reverse over one forward level (``grad`` of
    ``jvp`` and eager ``forward_ad`` then ``autograd.grad``: the rule is linear in the saved
    tensors, so its torch ops are differentiated exactly) matches the float64 reference."""
    import torch.autograd.forward_ad as fwad

    seed, host, v = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6)
    alpha, t_alpha = torch.tensor([0.2, 0.7, 0.4]), torch.randn(3)

    def op(s, a):
        return alpha_blend(torch.tanh(s), host, a, mode).square().sum()

    def ref(s, a):
        return alpha_blend_reference(torch.tanh(s), host.double(), a, mode).square().sum()

    def jvp_of(fn):
        return lambda s, a: torch.func.jvp(fn, (s, a), (v.to(s.dtype), t_alpha.to(a.dtype)))[1]

    with pytest.raises(RuntimeError, match="alpha_blend supports a single forward-mode"):
        torch.func.jvp(jvp_of(op), (seed, alpha), (v, t_alpha))
    with pytest.raises(RuntimeError, match="alpha_blend supports a single forward-mode"):
        torch.func.jacfwd(torch.func.jacfwd(op))(seed, alpha)
    if mode == "incubate":  # the reference's straight-through Function has a rule of its own
        with pytest.raises(RuntimeError, match="alpha_blend_reference supports a single"):
            torch.func.jacfwd(torch.func.jacfwd(ref))(seed.double(), alpha.double())
    got = torch.func.grad(jvp_of(op), argnums=(0, 1))(seed, alpha)
    want = torch.func.grad(jvp_of(ref), argnums=(0, 1))(seed.double(), alpha.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    s, a = seed.clone().requires_grad_(), alpha.clone().requires_grad_()
    with fwad.dual_level():
        tangent = fwad.unpack_dual(op(fwad.make_dual(s, v), fwad.make_dual(a, t_alpha))).tangent
    got = torch.autograd.grad(tangent, (s, a), allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
