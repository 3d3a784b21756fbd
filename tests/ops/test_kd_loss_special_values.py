"""kd_kl_loss on masked rows and non-finite or extreme logits, on both backends: all rows
masked, NaN in a masked row, an inf or NaN ``grad_output`` on a masked row, -inf and NaN
logits, -inf under a later teacher maximum (inf, not NaN), and huge finite differences (not
clamped)."""

from __future__ import annotations

import kasmina.kernels.kd_loss as kernels
import pytest
import torch

from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from tests.ops.kd_helpers import KERNEL_WARNINGS, REDUCTIONS
from tests.ops.kd_loss_helpers import NINF, _close, _logits, _oracle

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


def test_all_rows_masked_gives_zero(backend):
    student, teacher = _logits((3, 11), seed=9)
    student.requires_grad_(True)
    for reduction in ("mean", "batchmean"):
        student.grad = None
        loss = kd_kl_loss(student, teacher, 1.0, reduction, torch.zeros(3, dtype=torch.bool))
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(student.grad, torch.zeros_like(student))


def test_masked_rows_do_not_leak_nan(backend):
    student, teacher = _logits((3, 11), seed=10)
    student[1] = float("nan")
    teacher[1, 0] = float("nan")
    student.requires_grad_(True)
    mask = torch.tensor([True, False, True])
    loss = kd_kl_loss(student, teacher, 2.0, "batchmean", mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[1], torch.zeros(11))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_a_masked_row_gets_zero_whatever_its_grad_output(backend, reduction):
    """A masked (padding) row gets a 0 gradient. Per-row losses divided by a token count that
    is 0 on padding give it an inf or NaN ``grad_output``; the CPU path multiplied its zeroed
    row by it (0·inf = NaN) where the kernels give 0. A non-finite scalar ``grad_output``
    (a loss scale that overflowed) likewise leaves the masked rows 0."""
    student, teacher = _logits((3, 7), seed=31)
    mask = torch.tensor([True, False, True])
    for bad in (float("inf"), float("nan")):
        go = torch.tensor([1.0, bad, 0.5]) if reduction == "none" else torch.tensor(bad)
        for compiled in (False, True):
            s = student.clone().requires_grad_(True)
            op = lambda a: kd_kl_loss(a, teacher, 2.0, reduction, mask)  # noqa: E731
            (torch.compile(op, backend="aot_eager", fullgraph=True) if compiled else op)(
                s
            ).backward(go)
            assert torch.equal(s.grad[1], torch.zeros(7)), (bad, compiled)
            if reduction == "none":
                s64 = student.double().requires_grad_(True)
                ref = kd_kl_loss_reference(s64, teacher.double(), 2.0, reduction, mask)
                (want,) = torch.autograd.grad(ref, s64, go.double().masked_fill(~mask, 0.0))
                _close(s.grad, want, torch.float32)


def test_inf_and_nan_logits(backend):
    student, teacher = _logits((5, 12), seed=11)
    teacher[0, :3] = NINF  # teacher mass 0 there: those terms vanish
    student[0, 1] = NINF  # ... also where the student is -inf too
    student[1, 4] = NINF  # teacher has mass where the student has none: infinite KL
    student[2, 5] = float("nan")
    teacher[4] = NINF  # no teacher mass at all: undefined
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 1.5, "none")
    log_ps = torch.log_softmax(student[0].detach().double() / 1.5, -1)
    log_pt = torch.log_softmax(teacher[0, 3:].double() / 1.5, -1)  # teacher mass off 0..2
    row0 = (log_pt.exp() * (log_pt - log_ps[3:])).sum() * 1.5**2
    torch.testing.assert_close(loss[0].double(), row0, rtol=1e-5, atol=1e-6)
    assert loss[1] == float("inf")
    assert torch.isnan(loss[2]) and torch.isnan(loss[4])
    assert torch.isfinite(loss[3])
    (grad,) = torch.autograd.grad(loss[:2].sum(), student)
    assert torch.isfinite(grad[:2]).all()
    keep = torch.tensor([True, True, False, True, False])
    _, exp_grad = _oracle(student[keep][:2], teacher[keep][:2], 1.5, "sum")
    _close(grad[:2], exp_grad, torch.float32)


def test_student_inf_then_teacher_max_jump_is_inf_not_nan(backend):
    """Regression: a student -inf under teacher mass early in a row, then a teacher maximum
    so much larger that rescaling the running cross term underflows to 0 (it used to give
    inf·0 = NaN); and a student -inf where the teacher weight underflows fp32 but not float64.
    float64 says +inf for both rows; the gradient stays finite."""
    block = 16
    student, teacher = _logits((2, 4 * block), seed=12, scale=1.0)
    student[0, 3] = NINF  # lane 3 of the first block ...
    teacher[0, 3 + 2 * block] = 400.0  # ... sees the jump two blocks later (2^-288 = 0)
    student[1, 7] = NINF
    teacher[1, 7] = -300.0  # 2^(-433/T) underflows fp32; float64 keeps it positive
    student.requires_grad_(True)
    if backend == "triton":
        loss, stats, scale = kernels.kd_forward(
            student.detach(), teacher, None, 1.0, "none", True, block_v=block
        )
        grad = kernels.kd_backward(
            student.detach(), teacher, None, stats, scale, torch.ones(2), 1.0, "none"
        )
    else:
        loss = kd_kl_loss(student, teacher, 1.0, "none")
        (grad,) = torch.autograd.grad(loss.sum(), student)
    exp_loss, exp_grad = _oracle(student, teacher, 1.0, "none")
    assert torch.isinf(exp_loss).all() and (exp_loss > 0).all()
    assert torch.equal(loss, torch.full((2,), float("inf")))
    assert torch.isfinite(grad).all()
    _close(grad, exp_grad, torch.float32)


@pytest.mark.parametrize("scale, temperature", [(1e30, 1.0), (1e34, 1.0), (1e30, 1e-3)])
def test_huge_finite_differences_are_not_clamped(backend, scale, temperature):
    """``|t - s|·log2(e)/T`` far above 1e30 but within fp32's sums: the cross term adds
    ``t - s`` as it is (the kernel once clamped it to ±1e30, giving a wrong, even negative,
    KL); both backends follow float64 to fp32 rounding."""
    student, teacher = _logits((3, 8), seed=41, scale=scale)
    got = kd_kl_loss(student, teacher, temperature, "none")
    want, _ = _oracle(student, teacher, temperature, "none")
    assert bool((got >= 0).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0.0)
