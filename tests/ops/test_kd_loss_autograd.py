"""kd_kl_loss under autograd and ``torch.func``, on both backends: what the forward saves
(row statistics, nothing logits-sized, on the kernels), a retained graph, ``create_graph``
(exact first order; a second order raises), gradcheck of the reference and of the CPU path's
backward formula, ``torch.func.grad``/``vjp`` (also compiled), ``vmap`` refused, forward mode
(``jvp``, ``forward_ad``, ``jacfwd``) against the float64 reference, and nested forward mode
refused naming the op."""

from __future__ import annotations

import pytest
import torch

from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from kasmina.ops.kd_loss import kd_backward_reference, kd_forward_reference
from tests.ops.kd_helpers import KERNEL_WARNINGS, REDUCTIONS, _gen
from tests.ops.kd_loss_helpers import _close, _logits, _oracle, _strided_pair
from tests.ops.tolerances import DTYPES

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


def test_forward_keeps_only_row_statistics(backend):
    """docs/design.md §2: the kernels store nothing logits-sized between forward and backward
    (the saved tensors are the inputs themselves and ``[rows, 4]`` statistics); the CPU path
    stores the unscaled fp32 gradient instead, and nothing else logits-sized."""
    base, student, teacher = _strided_pair(2, 4, 50, torch.bfloat16, torch.bfloat16, seed=16)
    loss = kd_kl_loss(student, teacher, 2.0, "batchmean")
    saved = loss.grad_fn.saved_tensors
    inputs = {student.data_ptr(), teacher.data_ptr()}
    big = [t for t in saved if t is not None and t.numel() > 8 * 4]
    if backend == "triton":
        assert {t.data_ptr() for t in big} <= inputs and len(big) == 2
        assert saved[3].shape == (2, 4, 4)
    else:
        assert len(big) == 1 and big[0].shape == (2, 4, 50) and big[0].dtype == torch.float32
        assert big[0].data_ptr() not in inputs


def test_retain_graph_backward_twice(backend):
    student, teacher = _logits((2, 20), seed=12)
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 2.0, "mean")
    (first,) = torch.autograd.grad(loss, student, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student)
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_create_graph_first_order_exact_and_second_backward_raises(backend, reduction):
    """The backward is once-differentiable (docs/design.md §2). Under ``create_graph=True``
    the first-order gradients are exact, and a gradient penalty through them raises instead of
    silently missing the softmax's second-order term, also when the incoming gradient (the
    default 1) needs no grad while the student does: the case plain ``once_differentiable``
    lets through (here via ``x @ w``, the penalty reaching the op through ``w``)."""
    student, teacher = _logits((3, 7), seed=64)
    x = student.clone().requires_grad_(True)
    w = (torch.randn(7, 7, generator=_gen(65)) * 0.5).requires_grad_(True)
    logits = x @ w
    loss = kd_kl_loss(logits, teacher, 2.0, reduction)
    out = loss.sum() if reduction == "none" else loss
    gx, gw = torch.autograd.grad(out, (x, w), create_graph=True)
    _, grad = _oracle(logits, teacher, 2.0, reduction, grad_output=torch.ones(loss.shape))
    _close(gx, grad @ w.detach().double().t(), torch.float32)
    _close(gw, x.detach().double().t() @ grad, torch.float32)
    assert not gx._is_view() and not gw._is_view()  # a caller may scale them in place
    for penalty in (gx.pow(2).sum(), gw.pow(2).sum()):
        with pytest.raises(RuntimeError, match="differentiate twice"):
            penalty.backward(retain_graph=True)
    (g,) = torch.autograd.grad(kd_kl_loss(x, teacher, 2.0), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward(retain_graph=True)
    # A second derivative asked of named inputs (which prunes what hangs off the incoming
    # gradient alone) raises too, rather than returning an incomplete value, or None.
    for penalty, wrt in ((g.pow(2).sum(), x), (gw.pow(2).sum(), x), (gx.pow(2).sum(), w)):
        for allow_unused in (False, True):
            with pytest.raises(RuntimeError, match="differentiate twice"):
                torch.autograd.grad(penalty, wrt, retain_graph=True, allow_unused=allow_unused)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.functional.hessian(lambda s: kd_kl_loss(s, teacher, 2.0), x.detach())
    # The custom op torch.compile uses (called eagerly) raises too: its backward is an op
    # with no autograd formula.
    loss = torch.ops.kasmina.kd_kl_loss(x @ w, teacher, None, 2.0, "batchmean", True)[0]
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        gx.pow(2).sum().backward()


def test_gradcheck_reference_float64():
    """The plain-torch oracle, and the CPU path's own backward formula (run in float64)."""
    gen = _gen(14)
    student = torch.randn(2, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 2, 5, dtype=torch.float64, generator=gen)
    mask = torch.tensor([[True, False], [True, True]])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda s, r=reduction: kd_kl_loss_reference(s, teacher, 1.7, r, mask), (student,)
        )

    class CPUPath(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, reduction):
            loss, stats, scale = kd_forward_reference(s, teacher, mask, 1.7, reduction, True)
            ctx.save_for_backward(s, stats, scale)
            ctx.reduction = reduction
            return loss

        @staticmethod
        def backward(ctx, go):
            s, stats, scale = ctx.saved_tensors
            grad = kd_backward_reference(s, teacher, mask, stats, scale, go, 1.7, ctx.reduction)
            return grad, None

    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(lambda s, r=reduction: CPUPath.apply(s, r), (student,))


@pytest.mark.parametrize("reduction, masked", [("batchmean", False), ("none", True)])
def test_torch_func_grad_and_vjp_match_eager_autograd(backend, reduction, masked):
    """``torch.func.grad``/``vjp`` run the Function (``setup_context`` form) and the backward
    on the plain tensors: the gradients equal eager autograd's and the float64 oracle's."""
    student, teacher = _logits((4, 37), seed=42)
    mask = torch.tensor([True, False, True, True]) if masked else None
    go = torch.rand(4, generator=_gen(43)) if reduction == "none" else torch.tensor(1.0)

    def f(x):
        return (kd_kl_loss(x, teacher, 2.0, reduction, mask) * go).sum()

    got = torch.func.grad(f)(student)
    _, vjp_fn = torch.func.vjp(lambda x: kd_kl_loss(x, teacher, 2.0, reduction, mask), student)
    (got_vjp,) = vjp_fn(go if reduction == "none" else go.reshape(()))
    x = student.clone().requires_grad_()
    (eager,) = torch.autograd.grad(f(x), x)
    _, want = _oracle(student, teacher, 2.0, reduction, mask, grad_output=go)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_vjp, eager, rtol=1e-6, atol=1e-7)
    _close(got, want, torch.float32)


@pytest.mark.parametrize(
    "reduction, masked", [("batchmean", True), ("none", False), ("mean", True)]
)
def test_a_compiled_torch_func_grad_matches_the_oracle(reduction, masked):
    """Inside ``torch.compile`` of a ``torch.func`` transform neither the custom op (it has no
    ``torch.func`` rule: TorchDynamo raised) nor the Function serves: the loss runs as plain
    torch ops there, the float64 oracle's value and gradient, a dropped row's NaN in neither."""
    student, teacher = _logits((4, 37), seed=44)
    mask = torch.tensor([True, False, True, True]) if masked else None
    go = torch.rand(4, generator=_gen(45)) if reduction == "none" else torch.tensor(1.0)
    want_loss, want = _oracle(student, teacher, 2.0, reduction, mask, grad_output=go)
    if masked:
        student[1] = float("nan")  # a dropped row

    def f(x):
        return (kd_kl_loss(x, teacher, 2.0, reduction, mask) * go).sum()

    torch._dynamo.reset()
    compiled = torch.compile(torch.func.grad_and_value(f), fullgraph=True, backend="aot_eager")
    got, value = compiled(student)
    torch._dynamo.reset()
    _close(got, want, torch.float32)
    _close(value, (want_loss * go.double()).sum(), torch.float32)
    if masked:
        assert bool((got[1] == 0).all())


def test_torch_func_vmap_and_nested_grad_raise_clearly(backend):
    """vmap (and transforms over the backward) are refused naming the op, on both backends;
    so is a second order through ``torch.func`` (the backward records no graph, so it would
    be silently zero)."""
    student, teacher = _logits((2, 3, 5), seed=44)
    with pytest.raises(RuntimeError, match="kd_kl_loss does not support torch.vmap"):
        torch.vmap(lambda a, b: kd_kl_loss(a, b, 1.0, "sum"))(student, teacher)
    inner = torch.func.grad(lambda x: kd_kl_loss(x, teacher[0], 2.0))
    with pytest.raises(RuntimeError, match="kd_kl_loss is differentiable once"):
        torch.func.grad(lambda y: inner(y).square().sum())(student[0])
    with pytest.raises(RuntimeError, match="kd_kl_loss"):
        torch.func.jacrev(lambda x: kd_kl_loss(x, teacher[0], 2.0, "none"))(student[0])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_mode_matches_the_float64_reference(backend, dtype, reduction, masked):
    """Forward-mode AD was refused (``NotImplementedError``, a deliberate stub), and a dual
    student without grad skipped the Function: the kernels ran on the primal and the tangent
    was dropped (None, read as zero). Now ``torch.func.jvp`` and ``forward_ad`` (with and
    without grad) give the float64 reference's tangent, ``T·scale·Σ(p_s - p_t)·t`` per row;
    a teacher's tangent adds nothing (it is detached) and a masked row nothing, even an
    infinite tangent there."""
    import torch.autograd.forward_ad as fwad

    shape, temperature = (3, 5, 37), 1.7
    student, teacher = _logits(shape, dtype, seed=len(reduction) + 10 * masked)
    t_student, t_teacher = _logits(shape, dtype, seed=99, scale=1.0)
    mask = torch.rand(shape[:-1], generator=_gen(5)) > 0.4 if masked else None
    if masked:
        t_student[~mask] = float("inf")

    def reference(s):
        return kd_kl_loss_reference(s, teacher.double(), temperature, reduction, mask)

    want_loss, want = torch.func.jvp(reference, (student.double(),), (t_student.double(),))

    def op(s, t):
        return kd_kl_loss(s, t, temperature, reduction, mask)

    loss, got = torch.func.jvp(op, (student, teacher), (t_student, t_teacher))
    assert got.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for requires_grad in (False, True):
        with fwad.dual_level():
            dual = fwad.make_dual(student.clone().requires_grad_(requires_grad), t_student)
            out = kd_kl_loss(dual, fwad.make_dual(teacher, t_teacher), temperature, reduction, mask)
            tangent = fwad.unpack_dual(out).tangent
        assert tangent is not None, requires_grad
        torch.testing.assert_close(tangent.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_jacfwd_equals_autograd_jacobian(backend, reduction):
    """``jacfwd`` through the op equals autograd's reverse-mode Jacobian (the Function's
    ``vmap`` refusal is not reached: the primals are not batched)."""
    student, teacher = _logits((2, 9), seed=4)
    mask = torch.tensor([True, False])

    def fn(s):
        return kd_kl_loss(s, teacher, 2.0, reduction, mask)

    torch.testing.assert_close(
        torch.func.jacfwd(fn)(student), torch.autograd.functional.jacobian(fn, student)
    )


def test_nested_forward_mode_and_reverse_over_forward_raise_naming_the_op(backend):
    """PyTorch runs a Function's ``jvp`` rule below outer transforms without differentiating
    it, and the rule's ``p_s - p_t`` records no graph of the student: ``jvp`` of ``jvp`` and
    ``jacfwd(jacfwd)`` gave 0 for the softmax's second-order term, ``grad`` of ``jvp`` and an
    eager backward through a ``forward_ad`` tangent (a Hessian-vector product) a wrong value
    or a generic error. Now each raises naming the op; ``jacfwd`` alone still works."""
    import torch.autograd.forward_ad as fwad

    student, teacher = _logits((2, 9), seed=6)
    v = torch.randn(2, 9, generator=_gen(7))

    def fn(s):
        return kd_kl_loss(s, teacher, 2.0, "sum")

    def jvp_of(s):
        return torch.func.jvp(fn, (s,), (v,))[1]

    with pytest.raises(RuntimeError, match="kd_kl_loss supports a single forward-mode"):
        torch.func.jvp(jvp_of, (student,), (v,))
    with pytest.raises(RuntimeError, match="kd_kl_loss supports a single forward-mode"):
        torch.func.jacfwd(torch.func.jacfwd(fn))(student)
    with pytest.raises(RuntimeError, match="kd_kl_loss supports a single forward-mode"):
        torch.func.grad(jvp_of)(student)
    x = student.clone().requires_grad_()
    with fwad.dual_level():
        out = fn(fwad.make_dual(x, v))
        loss, tangent = fwad.unpack_dual(out)
    want = torch.func.jvp(lambda s: kd_kl_loss_reference(s, teacher, 2.0, "sum"), (student,), (v,))
    torch.testing.assert_close(tangent, want[1])  # the first order is exact
    with pytest.raises(RuntimeError, match="kd_kl_loss is differentiable once"):
        torch.autograd.grad(tangent, x)
    (grad,) = torch.autograd.grad(loss, x)  # the loss's own backward is unaffected
    torch.testing.assert_close(grad, torch.func.grad(fn)(student))
    assert torch.func.jacfwd(fn)(student).shape == student.shape
