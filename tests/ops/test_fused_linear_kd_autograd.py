"""fused_linear_kd_loss under autograd: no-grad mode and a retained graph, gradcheck of the
reference and of the chunked implementation, a per-row ``grad_output`` that is expanded,
strided or weighted in place (eager and compiled), ``create_graph`` (exact first order; a
second order raises), and ``torch.func`` transforms refused naming the op."""

from __future__ import annotations

import pytest
import torch

import kasmina.ops.fused_linear_kd as flkd
from kasmina.ops import fused_linear_kd_loss, fused_linear_kd_loss_reference
from tests.ops.fused_linear_kd_helpers import _close, _inputs, _oracle, _use_backend
from tests.ops.kd_helpers import DEVICE, KERNEL_WARNINGS, REDUCTIONS, _gen

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


def test_no_grad_and_retain_graph():
    h, w, b, _, _, _, tl, mask = _inputs((3, 3), 8, 20, torch.float32, seed=10)
    for reduction in ("batchmean", "none"):
        with torch.no_grad():
            plain = fused_linear_kd_loss(h, w, tl, student_bias=b, mask=mask, chunk_rows=2,
                                         reduction=reduction)  # fmt: skip
        assert not plain.requires_grad
        loss = fused_linear_kd_loss(h, w, tl, student_bias=b, mask=mask, chunk_rows=2,
                                    reduction=reduction)  # fmt: skip
        torch.testing.assert_close(plain, loss.detach(), rtol=0, atol=0)
        first = torch.autograd.grad(loss.sum(), (h, w, b), retain_graph=True)
        second = torch.autograd.grad(loss.sum(), (h, w, b))
        assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


def test_gradcheck_reference_float64():
    g = _gen(13)
    h = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    tl = torch.randn(2, 3, 5, dtype=torch.float64, generator=g)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for reduction in REDUCTIONS:

        def ref(h, w, b, reduction=reduction):
            return fused_linear_kd_loss_reference(
                h, w, tl, student_bias=b, temperature=1.3, reduction=reduction, mask=mask,
                student_logit_scale=0.7, student_softcap=2.0,
            )  # fmt: skip

        assert torch.autograd.gradcheck(ref, (h, w, b))


def test_gradcheck_chunked_path_float64():
    """The chunked implementation itself (the CPU path, in float64 below the public dtype check:
    chunks, soft-cap chain rule, scale, accumulators) by finite differences."""
    g = _gen(14)
    h = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    th = torch.randn(7, 2, dtype=torch.float64, generator=g)
    tw = torch.randn(6, 2, dtype=torch.float64, generator=g)
    mask = torch.tensor([True, True, False, True, True, True, False])
    for reduction in REDUCTIONS:
        cfg = flkd._Config(1.4, reduction, 3, 0.8, 1.2, 2.5, 3.0, True, True, True)

        def run(h, w, b, cfg=cfg):
            return flkd._FusedFunction.apply(h, w, b, None, th, tw, None, mask, cfg)

        assert torch.autograd.gradcheck(run, (h, w, b))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("objective", ["sum", "strided", "inplace"])
def test_none_reduction_under_sum_and_strided_grad_output(monkeypatch, backend, mode, objective):
    """``"none"`` then ``.sum()`` (an expanded ``grad_output``) or a ``stack(...)[..., 0]``
    weight (a stride-2 one): the per-row ``grad_output`` is read by row, eager and compiled.
    ``"inplace"``: the rows weighted in place (``loss *= w``), which raised in eager mode (the
    rows were a view of the op's own buffer)."""
    if backend == "triton" and DEVICE.type == "cpu":
        if __import__("os").environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    h, w, b, _, _, _, tl, _ = _inputs((2, 3), 8, 11, torch.float32, seed=60)
    weight = torch.randn(2, 3, 2, generator=_gen(61))

    def step(h, w, b):
        loss = fused_linear_kd_loss(
            h, w, tl, student_bias=b, temperature=2.0, reduction="none", chunk_rows=4
        )
        if objective == "sum":
            return loss.sum()
        if objective == "inplace":
            loss *= weight[..., 0]
            return loss.sum()
        return (torch.stack((loss, torch.zeros_like(loss)), -1) * weight).sum()

    torch._dynamo.reset()
    fn = step if mode == "eager" else torch.compile(step, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(fn(h, w, b), (h, w, b))
    go = torch.ones(2, 3) if objective == "sum" else weight[..., 0]
    _, want = _oracle(h, w, b, tl, 2.0, "none", grad_output=go)
    for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
        _close(x, y, torch.float32, what)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_create_graph_first_order_exact_and_second_backward_raises(monkeypatch, backend, reduction):
    """The backward is once-differentiable (docs/design.md §2): under ``create_graph=True``
    the first-order gradients are exact, and a gradient penalty through them raises instead of
    silently missing the second-order term (the incoming gradient, 1, needs no grad; the
    hidden states and the head do)."""
    _use_backend(monkeypatch, backend)
    h, w, b, _, _, _, tl, mask = _inputs((2, 3), 8, 11, torch.float32, seed=66)
    loss = fused_linear_kd_loss(
        h, w, tl, student_bias=b, temperature=1.5, reduction=reduction, mask=mask, chunk_rows=4
    )
    out = loss.sum() if reduction == "none" else loss
    got = torch.autograd.grad(out, (h, w, b), create_graph=True)
    _, want = _oracle(h, w, b, tl, 1.5, reduction, mask, grad_output=torch.ones(loss.shape))
    for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
        _close(x, y, torch.float32, what)
        assert not x._is_view(), what  # a caller may scale it in place
        with pytest.raises(RuntimeError, match="differentiate twice"):
            x.pow(2).sum().backward(retain_graph=True)
        # Asked of named inputs (``autograd.grad``, ``allow_unused``) it raises too, rather
        # than returning an incomplete value, or None.
        for wrt in (h, w, b):
            with pytest.raises(RuntimeError, match="differentiate twice"):
                torch.autograd.grad(x.pow(2).sum(), wrt, retain_graph=True, allow_unused=True)


def test_torch_func_transforms_are_refused_naming_the_op():
    """Its Function is not in ``torch.func``'s form and its chunk loop calls ``mm`` with
    ``out=``, which vmap has no rule for: every transform is refused with the op's name, not
    a batching-rule error from deep inside."""
    h, w, t = torch.randn(5, 3, 4), torch.randn(7, 4), torch.randn(5, 3, 7)
    for transform in (
        lambda: torch.vmap(lambda h, t: fused_linear_kd_loss(h, w, t))(h, t),
        lambda: torch.func.grad(lambda h: fused_linear_kd_loss(h, w, t))(h),
    ):
        with pytest.raises(RuntimeError, match="fused_linear_kd_loss does not support torch.func"):
            transform()
