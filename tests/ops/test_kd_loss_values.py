"""kd_kl_loss's loss and student gradient, on the Triton kernels (through the interpreter on
a CPU) and the CPU path, against an independent float64 oracle built on ``F.kl_div``: every
reduction, masks, temperatures, non-unit ``grad_output``, every dtype and a bf16 teacher, the
fp16 gradient error against eager PyTorch's and under loss scaling, the custom op against the
eager path, and precision at small temperatures and small KLs far from 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from tests.ops.kd_helpers import KERNEL_WARNINGS, REDUCTIONS, _gen
from tests.ops.kd_loss_helpers import _close, _logits, _oracle
from tests.ops.tolerances import DTYPES

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_matches_oracle_with_masks_and_grad_output(backend, launched, reduction, temperature):
    """Against the float64 oracle, and the gradient against autograd of the plain-torch
    reference in float64, with a non-unit (per-row for ``none``) ``grad_output``."""
    student, teacher = _logits((2, 3, 37), seed=20 + len(reduction))
    student.requires_grad_(True)
    gen = _gen(6)
    for mask in (None, torch.rand(2, 3, generator=gen) > 0.4):
        student.grad = None
        loss = kd_kl_loss(student, teacher, temperature, reduction, mask)
        go = torch.randn(loss.shape, generator=gen)
        loss.backward(go)
        exp_loss, _ = _oracle(student, teacher, temperature, reduction, mask)
        s64 = student.detach().double().requires_grad_(True)
        ref = kd_kl_loss_reference(s64, teacher.double(), temperature, reduction, mask)
        (exp_grad,) = torch.autograd.grad(ref, s64, go.double())
        _close(loss, exp_loss, torch.float32)
        _close(student.grad, exp_grad, torch.float32)
    kernels_run = ["_kd_fwd_kernel", "_kd_bwd_kernel"] * 2  # one pass per mask
    assert launched == (kernels_run if backend == "triton" else [])


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_low_precision_and_mixed_teacher(backend, dtype):
    student, teacher = _logits((3, 70), dtype, seed=7)
    teacher = teacher.to(torch.bfloat16)  # a bf16 teacher under any student dtype
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 2.0, "sum")
    loss.backward(torch.tensor(0.75))
    exp_loss, exp_grad = _oracle(student, teacher, 2.0, "sum")
    assert student.grad.dtype == dtype
    _close(loss, exp_loss, dtype)
    _close(student.grad, exp_grad * 0.75, dtype)


def test_fp16_gradient_error_not_above_eager(backend):
    """At V = 65,536 almost every fp16 gradient element is subnormal. The gradient is computed
    in fp32 and rounded once, so its error against float64 is the rounding error itself, at
    most eager PyTorch's (which rounds log-probabilities and products to fp16 on the way)."""
    gen = _gen(30)
    student = (torch.randn(4, 65_536, generator=gen) * 2).half().requires_grad_(True)
    teacher = (torch.randn(4, 65_536, generator=gen) * 2).half()
    _, exact = _oracle(student, teacher, 1.0, "batchmean")
    (ours,) = torch.autograd.grad(kd_kl_loss(student, teacher, 1.0, "batchmean"), student)
    log_ps, log_pt = F.log_softmax(student, -1), F.log_softmax(teacher, -1)
    eager_loss = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    (eager,) = torch.autograd.grad(eager_loss, student)

    def error(g):
        return float((g.double() - exact).norm() / exact.norm())

    assert ours.dtype == torch.float16
    assert error(ours) <= error(eager)
    assert error(ours) <= error(exact.half()) * 1.01  # ~ the correctly rounded gradient's


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_survives_loss_scaling(backend, dtype, reduction):
    """A GradScaler-style ``(loss * 65536).backward()``: the reduction's ``1/rows`` or
    ``1/(rows·V)`` meets ``grad_output`` in fp32 before the one rounding, so the fp16
    gradient is not flushed to zero. (bf16 has fp32's exponent range: a regression guard.)"""
    student, teacher = _logits((16, 2000), dtype, seed=17, scale=0.2)
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 2.0, reduction)
    (loss * 65536.0).backward()
    _, expected = _oracle(student, teacher, 2.0, reduction)
    expected = expected * 65536.0
    assert student.grad.dtype == dtype
    assert (student.grad != 0).float().mean() > 0.9  # not flushed to zero
    _close(student.grad, expected, dtype)


def test_matches_f_kl_div_and_teacher_gets_no_grad(backend):
    student, teacher = _logits((4, 6, 29), seed=8)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    t = 3.0
    loss = kd_kl_loss(student, teacher, t)  # batchmean over the 24 rows
    flat_s, flat_t = student.reshape(-1, 29), teacher.reshape(-1, 29)
    expected = F.kl_div(
        F.log_softmax(flat_s / t, -1),
        F.log_softmax(flat_t / t, -1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_a_teacher_made_under_inference_mode_is_accepted(backend):
    """A teacher run under ``torch.inference_mode()`` hands over inference tensors, which
    autograd refuses to save: the op takes them all the same, with the same loss and grad."""
    student, teacher = _logits((3, 5, 17), seed=9)
    mask = torch.tensor([True, False, True]).unsqueeze(-1).expand(3, 5)
    with torch.inference_mode():
        frozen_teacher, frozen_mask = teacher.clone(), mask.clone()
    grads = []
    for t, m in ((teacher, mask), (frozen_teacher, frozen_mask)):
        s = student.detach().requires_grad_(True)
        loss = kd_kl_loss(s, t, 2.0, mask=m)
        loss.backward()
        grads.append((loss.detach(), s.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_custom_op_matches_eager_function(backend, reduction):
    """The custom op torch.compile uses (called eagerly here) against the eager path."""
    student, teacher = _logits((3, 2, 45), seed=15)
    mask = torch.tensor([[True, True], [False, True], [True, False]])
    results = []
    for call in ("public", "custom-op"):
        s = student.clone().requires_grad_(True)
        if call == "public":
            loss = kd_kl_loss(s, teacher, 1.3, reduction, mask)
        else:
            loss, stats, scale = torch.ops.kasmina.kd_kl_loss(
                s, teacher, mask, 1.3, reduction, True
            )
            assert not stats.requires_grad and not scale.requires_grad
            assert stats.shape == (3, 2, 4)
        go = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
        loss.backward(go)
        results.append((loss.detach(), s.grad))
    for eager, op in zip(*results, strict=True):
        torch.testing.assert_close(op, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("temperature", [1e-3, 1e-4, 1e-10, 1e-18])
def test_small_temperature_gradient(backend, mode, temperature):
    """LLM-sized logits at small T: the backward's exponents must be the forward's rounded
    ``fl(fl(s - M)·k)`` (any other form differs by a rounding that grows as ``1/T``), so the
    gradient matches float64 tightly and each row sums to 0; the loss stays finite."""
    student, teacher = _logits((4, 64), seed=55, scale=30.0)

    def step(s):
        return kd_kl_loss(s, teacher, temperature, "sum")

    torch._dynamo.reset()
    fn = step if mode == "eager" else torch.compile(step, fullgraph=True, backend="aot_eager")
    s = student.clone().requires_grad_(True)
    loss = fn(s)
    loss.backward()
    exp_loss, exp_grad = _oracle(student, teacher, temperature, "sum")
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=0.0)
    size = float(exp_grad.abs().max())
    assert float((s.grad.double() - exp_grad).abs().max()) <= 1e-6 * size
    assert float(s.grad.double().sum(-1).abs().max()) <= 1e-6 * size
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "offset, apart, temperature, spread",
    [
        (0.0, 0.0, 1.0, 1e-3),
        (1000.0, 0.0, 1.0, 1e-3),
        (-200.0, 0.0, 2.0, 1e-2),
        (100.0, 0.0, 0.5, 1e-3),
        (0.0, 1000.0, 1.0, 1e-3),
        (0.0, -1e5, 4.0, 0.3),
        (0.0, 1e30, 1.0, 0.3),
    ],
)
def test_small_kl_as_precise_as_eager_whatever_the_logits_offset(
    backend, offset, apart, temperature, spread
):
    """A student close to its teacher (per-row KL ~1e-7..1e-2) with logits far from 0, or far
    from the teacher's (``apart``: the KL does not see a row's offset, so nothing holds the
    student's near the teacher's; a head bias moves it): the loss rows and the gradient are as
    close to float64 as eager fp32 (``log_softmax`` takes each side's maximum off first; three
    times its error is allowed). Every difference is taken off its own side's anchor first:
    the exponents are ``(x - M)·k``, never ``k·x - k·M``, the cross term's ``(t - M_b) -
    (s - M_a)``, never ``t - s``, and no ``lse = k·M + log2 Z`` is formed. Their roundings,
    ``ulp`` of the offset, once left each row an error of ~1e-4 at an offset of 1000 (hundreds
    of times a KL of 1e-7), of 1e-2 with the student 1e5 above its teacher, a negative loss
    there at T = 4, and 1e23 at 1e30."""
    gen = _gen(58)
    teacher = offset + 3.0 * torch.randn(16, 1000, generator=gen)
    student = teacher + spread * torch.randn(16, 1000, generator=gen) + apart
    s = student.clone().requires_grad_(True)
    rows = kd_kl_loss(s, teacher, temperature, "none")
    rows.sum().backward()
    want_rows, want_grad = _oracle(student, teacher, temperature, "none")
    want_grad = want_grad.double()
    e = student.clone().requires_grad_(True)
    eager = F.kl_div(
        F.log_softmax(e / temperature, -1),
        F.log_softmax(teacher / temperature, -1),
        reduction="none",
        log_target=True,
    ).sum(-1) * (temperature**2)
    eager.sum().backward()
    err_rows = float((rows.double() - want_rows).abs().max())
    eager_rows = float((eager.double() - want_rows).abs().max())
    assert err_rows <= 3.0 * eager_rows
    err_grad = float((s.grad.double() - want_grad).abs().max())
    eager_grad = float((e.grad.double() - want_grad).abs().max())
    assert err_grad <= 3.0 * eager_grad
