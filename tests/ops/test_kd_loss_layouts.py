"""kd_kl_loss on strided, shifted (``logits[:, :-1]``), expanded and transposed logits, on both
backends: the row layout the kernels read in place, gradients laid out like the student,
per-row losses weighted in place, stride-0 and stride-2 ``grad_output`` and masks read by
row, eager and compiled, and no contiguous copy under Inductor."""

from __future__ import annotations

import kasmina.kernels.rows as row_addressing
import pytest
import torch

from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from kasmina.ops.kd_layout import grad_strides
from tests.ops.kd_helpers import KERNEL_WARNINGS, _gen
from tests.ops.kd_loss_helpers import _close, _logits, _oracle, _strided_pair
from tests.ops.tolerances import DTYPES

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


def test_row_layout_merges_leading_dims():
    assert row_addressing.row_layout((2, 3), [(30, 10)]) == (6, [(0, 10)])  # contiguous: one dim
    assert row_addressing.row_layout((2, 3), [(40, 10)]) == (3, [(40, 10)])  # logits[:, :-1]
    assert row_addressing.row_layout((1, 3), [(0, 10), (30, 10)]) == (3, [(0, 10), (0, 10)])
    assert row_addressing.row_layout((2, 3), [(0, 10), (40, 10)]) == (3, [(0, 10), (40, 10)])
    assert row_addressing.row_layout((2, 3, 4), [(100, 30, 5)]) is None  # three dims: copied
    assert row_addressing.row_layout((), [()]) == (1, [(0, 0)])


def test_strided_and_expanded_logits_are_read_in_place():
    base = torch.randn(2, 6, 33)
    student = base[:, :-1]
    teacher = torch.randn(1, 5, 33).expand(2, 5, 33)  # stride 0 across the batch
    s, t = row_addressing.readable_rows(student, teacher)
    assert s is student and t is teacher  # no copy
    assert grad_strides(student) == student.stride()  # the gradient shares the row phase
    assert grad_strides(teacher) == (165, 33, 1)  # overlapping (expanded): contiguous
    assert grad_strides(base[..., ::2]) == (102, 17, 1)  # not unit stride: contiguous
    assert grad_strides(base[:, :2]) == (66, 33, 1)  # span far above numel: contiguous
    transposed = torch.randn(4, 3, 9).transpose(0, 1)
    assert grad_strides(transposed) == transposed.stride()
    columns = torch.randn(33, 10).t()  # unit stride across rows, not along V: copied
    s, _ = row_addressing.readable_rows(columns, columns)
    assert s is not columns and s.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_op_on_shifted_and_expanded_views_every_dtype(backend, launched, dtype):
    """``kd_kl_loss(logits[:, :-1], teacher[:, :-1])`` with odd V and a bf16 teacher, then an
    expanded teacher; the gradient reaches the base logits, laid out like the view."""
    vocab = 257
    base, student, teacher = _strided_pair(2, 9, vocab, dtype, torch.bfloat16, seed=11)
    loss = kd_kl_loss(student, teacher, 2.0, "batchmean")
    (grad,) = torch.autograd.grad(loss, student, retain_graph=True)
    assert grad.dtype == dtype and grad.stride() == student.stride()
    loss.backward()
    exp_loss, exp_grad = _oracle(student, teacher, 2.0, "batchmean")
    _close(loss, exp_loss, dtype)
    _close(base.grad[:, :-1], exp_grad, dtype)
    assert torch.equal(base.grad[:, -1], torch.zeros_like(base.grad[:, -1]))

    shared = (torch.randn(1, 9, vocab, generator=_gen(12)) * 3).to(dtype).expand(2, 9, vocab)
    s = student.detach().clone().requires_grad_(True)
    go = torch.randn(2, 9, generator=_gen(13))
    loss = kd_kl_loss(s, shared, 1.5, "none")
    loss.backward(go)
    exp_loss, exp_grad = _oracle(s, shared, 1.5, "none", grad_output=go)
    _close(loss, exp_loss, dtype)
    _close(s.grad, exp_grad, dtype)
    kd = {"_kd_fwd_kernel", "_kd_bwd_kernel"}
    assert set(launched) == (kd if backend == "triton" else set())  # the oracle launches none


def test_per_row_losses_can_be_weighted_in_place(backend):
    """``reduction="none"`` rows weighted in place (``rows *= w``, as after ``F.kl_div``)
    raised in eager mode: they were a view of the op's own buffer."""
    student, teacher = _logits((3, 4, 9), seed=80)
    student.requires_grad_()
    weight = torch.rand(3, 4, generator=_gen(82))
    rows = kd_kl_loss(student, teacher, 2.0, reduction="none")
    assert rows._base is None
    rows *= weight
    (got,) = torch.autograd.grad(rows.sum(), student)
    want_rows = kd_kl_loss_reference(student.double(), teacher.double(), 2.0, "none")
    (want,) = torch.autograd.grad((want_rows * weight.double()).sum(), student)
    torch.testing.assert_close(rows.double(), (want_rows * weight).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)


def test_expanded_student_gets_a_dense_gradient(backend):
    row = torch.randn(1, 31, generator=_gen(14), requires_grad=True)
    student = row.expand(4, 31)
    teacher = torch.randn(4, 31, generator=_gen(15))
    kd_kl_loss(student, teacher, 1.0, "sum").backward()
    s = row.detach().expand(4, 31)
    _, exp_grad = _oracle(s, teacher, 1.0, "sum")
    _close(row.grad, exp_grad.sum(0, keepdim=True), torch.float32)


def test_no_grad_mode_and_transposed_logits(backend):
    student, teacher = _logits((5, 24), seed=13)
    with torch.no_grad():
        loss = kd_kl_loss(student.t(), teacher.t(), 1.0, "none")
    expected, _ = _oracle(student.t().contiguous(), teacher.t().contiguous(), 1.0, "none")
    _close(loss, expected, torch.float32)


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("objective", ["sum", "strided"])
def test_none_reduction_under_sum_and_strided_grad_output(backend, mode, objective):
    """``"none"`` then ``.sum()`` hands the backward an expanded (stride-0) ``grad_output``;
    ``stack(...)[..., 0]`` a stride-2 one. Both must be read per row, eager and compiled."""
    student, teacher = _logits((3, 4, 7), seed=50)
    weight = torch.randn(3, 4, 2, generator=_gen(51))

    def step(s):
        loss = kd_kl_loss(s, teacher, 2.0, "none")
        if objective == "sum":
            return loss.sum()
        return (torch.stack((loss, torch.zeros_like(loss)), -1) * weight).sum()

    torch._dynamo.reset()
    fn = step if mode == "eager" else torch.compile(step, fullgraph=True, backend="aot_eager")
    s = student.clone().requires_grad_(True)
    fn(s).backward()
    go = torch.ones(3, 4) if objective == "sum" else weight[..., 0]
    _, exp_grad = _oracle(student, teacher, 2.0, "none", grad_output=go)
    _close(s.grad, exp_grad, torch.float32)
    torch._dynamo.reset()


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_strided_masks(backend, reduction):
    """A mask whose ``reshape(-1)`` is a strided view (``mask[::2]``, ``m[..., 0]``) is read
    by row, not as if dense."""
    pairs = torch.tensor([[True, False], [False, True], [True, True]]).repeat(2, 1)
    cases = [
        (_logits((6, 9), seed=52), torch.tensor([True, False] * 6)[::2]),
        (_logits((2, 3, 9), seed=53), pairs.reshape(2, 3, 2)[..., 0]),
    ]
    for (student, teacher), mask in cases:
        assert mask.reshape(-1).stride() != (1,)
        s = student.clone().requires_grad_(True)
        loss = kd_kl_loss(s, teacher, 1.5, reduction, mask=mask)
        go = torch.randn(loss.shape, generator=_gen(54))
        loss.backward(go)
        exp_loss, exp_grad = _oracle(student, teacher, 1.5, reduction, mask.contiguous(), go)
        _close(loss, exp_loss, torch.float32)
        _close(s.grad, exp_grad, torch.float32)


def test_compiled_op_reads_shifted_logits_in_place(reference_backend, monkeypatch):
    """Under Inductor the op still receives ``logits[:, :-1]`` as a view (the custom op keeps
    the exact strides it was traced with): no contiguous copy before the kernel."""
    from kasmina.ops import kd_loss as ops_kd

    seen: list[bool] = []
    forward = ops_kd.kd_forward_reference

    def spy(student, *args):
        seen.append(student.is_contiguous())
        return forward(student, *args)

    monkeypatch.setattr(ops_kd, "kd_forward_reference", spy)
    torch._dynamo.reset()

    def step(hidden, weight, teacher):
        logits = hidden @ weight
        return kd_kl_loss(logits[:, :-1], teacher[:, :-1], 2.0)

    gen = _gen(40)
    hidden = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    weight = torch.randn(8, 33, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 33, generator=gen)
    loss = torch.compile(step, fullgraph=True)(hidden, weight, teacher)
    loss.backward()
    assert seen == [False]
    expected = kd_kl_loss_reference((hidden @ weight)[:, :-1], teacher[:, :-1], 2.0)
    torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
