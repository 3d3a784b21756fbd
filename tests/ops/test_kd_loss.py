"""kd_kl_loss: the Triton kernels (through the interpreter on a CPU) and the torch reference
against independent float64 math built on ``F.kl_div``; reductions, masks, temperatures,
gradients, -inf/NaN handling and input rejection."""

from __future__ import annotations

import kasmina.kernels.kd_loss as kernels
import pytest
import torch
import torch.nn.functional as F

from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from tests.ops.tolerances import DTYPES, tol

REDUCTIONS = ("none", "sum", "mean", "batchmean")


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KASMINA_BACKEND", request.param)
    return request.param


def _logits(shape, dtype=torch.float32, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return student, teacher


def _oracle(student, teacher, temperature, reduction, mask=None):
    """float64 ``T²·F.kl_div`` on log-softmaxed rows; returns (loss, d loss / d student)."""
    vocab = student.shape[-1]
    s64 = student.detach().double().requires_grad_(True)
    log_ps = torch.log_softmax(s64.reshape(-1, vocab) / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher.double().reshape(-1, vocab) / temperature, dim=-1)
    rows = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    rows = rows * temperature**2
    kept = rows.numel()
    if mask is not None:
        rows = rows * mask.reshape(-1)
        kept = int(mask.sum())
    if reduction == "none":
        loss = rows.reshape(student.shape[:-1])
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction == "mean":
        loss = rows.sum() / (max(kept, 1) * vocab)
    else:
        loss = rows.sum() / max(kept, 1)
    (grad,) = torch.autograd.grad(loss, s64, torch.ones_like(loss))
    return loss.detach(), grad


def _close(actual, expected, dtype):
    """Per-dtype tolerance, with ``atol`` relative to the largest expected magnitude (mean
    reductions make gradients ~1e-8, where an absolute atol would prove nothing)."""
    t = tol(dtype)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=t["rtol"], atol=t["atol"] * max(scale, 1e-30)
    )


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    ("dtype", "reduction", "masked"),
    [
        (torch.float32, "none", True),
        (torch.float32, "sum", False),
        (torch.float32, "mean", True),
        (torch.float32, "batchmean", False),
        (torch.float16, "batchmean", True),
        (torch.float16, "none", False),
        (torch.bfloat16, "mean", False),
        (torch.bfloat16, "sum", True),
    ],
)
def test_forward_kernel_matches_float64(dtype, reduction, masked):
    """Several loop steps over V (block 256, V=1000 is not a multiple), poisoned outputs. The
    stored gradient is the unscaled ``T·(p_s - p_t)``; the reduction's scale comes apart."""
    student, teacher = _logits((2, 2, 1000), dtype, seed=1)
    mask = torch.tensor([[True, False], [True, True]]) if masked else None
    grad_out = torch.full_like(student, float("nan"))
    rows_out = torch.full((4,), float("nan"))
    loss, grad, scale = kernels.kd_forward(
        student, teacher, mask, 2.0, reduction, True,
        grad_out=grad_out, loss_rows_out=rows_out, block_v=256,
    )  # fmt: skip
    assert grad is grad_out and grad.dtype == dtype and loss.dtype == torch.float32
    exp_loss, exp_grad = _oracle(student, teacher, 2.0, reduction, mask)
    _close(loss, exp_loss, dtype)
    if reduction in ("mean", "batchmean"):
        kept = 3 if masked else 4
        expected_scale = 1.0 / (kept * (1000 if reduction == "mean" else 1))
        assert scale.shape == () and scale.dtype == torch.float32
        torch.testing.assert_close(scale.item(), expected_scale, rtol=1e-6, atol=0.0)
        exp_grad = exp_grad / expected_scale
    else:
        assert scale.numel() == 0
    _close(grad, exp_grad, dtype)
    if mask is not None:
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # written, not left NaN


def test_large_vocab_row_through_triton(triton_backend):
    """V >= 131,072 (not a block multiple) streams through several loop steps."""
    vocab = 131_072 + 77
    student, teacher = _logits((2, vocab), seed=2)
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 1.5, "batchmean")
    loss.backward()
    exp_loss, exp_grad = _oracle(student, teacher, 1.5, "batchmean")
    _close(loss, exp_loss, torch.float32)
    _close(student.grad, exp_grad, torch.float32)


def test_backward_kernel_scales_stored_gradient():
    gen = torch.Generator().manual_seed(3)
    stored = torch.randn(3, 4, 50, generator=gen).to(torch.bfloat16)
    for go, scale in ((torch.tensor(2.5), None), (torch.randn(3, 4, generator=gen), None),
                      (torch.tensor(65536.0), torch.tensor(1 / 600.0))):  # fmt: skip
        out = torch.full_like(stored, float("nan"))
        result = kernels.kd_backward(stored, go, scale, out=out)
        assert result is out
        expected = stored.double() * (go.double() if go.dim() == 0 else go.double()[..., None])
        if scale is not None:
            expected = expected * scale.double()
        _close(result, expected, torch.bfloat16)
    in_place = stored.clone()
    assert kernels.kd_backward(in_place, torch.tensor(3.0), torch.tensor(0.5), out=in_place) is (
        in_place
    )
    _close(in_place, stored.double() * 1.5, torch.bfloat16)
    with pytest.raises(ValueError, match="grad_output"):
        kernels.kd_backward(stored, torch.randn(3))


def test_no_gradient_buffer_without_grad():
    student, teacher = _logits((4, 40), seed=4)
    loss, grad, scale = kernels.kd_forward(student, teacher, None, 1.0, "mean", False)
    assert grad.numel() == 0 and scale.numel() == 0
    loss, grad, scale = kernels.kd_forward(student, teacher, None, 1.0, "sum", False)
    assert grad.numel() == 0
    _close(loss, _oracle(student, teacher, 1.0, "sum")[0], torch.float32)


# --------------------------------------------------------------------------- op + autograd


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5, 4.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_matches_oracle_with_masks_and_grad_output(backend, reduction, temperature):
    student, teacher = _logits((2, 3, 37), seed=5)
    student.requires_grad_(True)
    gen = torch.Generator().manual_seed(6)
    for mask in (None, torch.rand(2, 3, generator=gen) > 0.4):
        student.grad = None
        loss = kd_kl_loss(student, teacher, temperature, reduction, mask)
        go = torch.randn(loss.shape, generator=gen)  # != 1, per row for "none"
        loss.backward(go)
        exp_loss, _ = _oracle(student, teacher, temperature, reduction, mask)
        s64 = student.detach().double().requires_grad_(True)
        ref = kd_kl_loss_reference(s64, teacher.double(), temperature, reduction, mask)
        (exp_grad,) = torch.autograd.grad(ref, s64, go.double())
        _close(loss, exp_loss, torch.float32)
        _close(student.grad, exp_grad, torch.float32)


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


@pytest.mark.parametrize("reduction", ["mean", "batchmean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradient_survives_loss_scaling(backend, dtype, reduction):
    """A GradScaler-style ``(loss * 65536).backward()``: the reduction's ``1/rows`` or
    ``1/(rows·V)`` must meet ``grad_output`` in fp32, not be rounded into fp16 first, where
    ``T·(p_s - p_t)/(rows·V)`` (~1e-10 here) underflows to 0 and ``/rows`` (~1e-6) is a
    subnormal with few bits left. (bf16 has fp32's exponent range: a regression guard.)"""
    student, teacher = _logits((64, 2000), dtype, seed=17, scale=0.2)
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
            loss, stored, scale = torch.ops.kasmina.kd_kl_loss(
                s, teacher, mask, 1.3, reduction, True
            )
            assert not stored.requires_grad and not scale.requires_grad
        go = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
        loss.backward(go)
        results.append((loss.detach(), s.grad))
    for eager, op in zip(*results, strict=True):
        torch.testing.assert_close(op, eager, rtol=1e-6, atol=1e-7)


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


def test_inf_and_nan_logits(backend):
    ninf = float("-inf")
    student, teacher = _logits((4, 12), seed=11)
    teacher[0, :3] = ninf  # teacher mass 0 there: those terms vanish
    student[1, 4] = ninf  # teacher has mass where the student has none: infinite KL
    student[2, 5] = float("nan")
    loss = kd_kl_loss(student, teacher, 1.5, "none")
    log_ps = torch.log_softmax(student[0].double() / 1.5, -1)  # all 12 columns
    log_pt = torch.log_softmax(teacher[0, 3:].double() / 1.5, -1)  # teacher mass off 0..2
    row0 = (log_pt.exp() * (log_pt - log_ps[3:])).sum() * 1.5**2
    torch.testing.assert_close(loss[0].double(), row0, rtol=1e-5, atol=1e-6)
    assert loss[1] == float("inf")
    assert torch.isnan(loss[2])
    assert torch.isfinite(loss[3])


def test_retain_graph_backward_twice(backend):
    student, teacher = _logits((2, 20), seed=12)
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 2.0, "mean")
    (first,) = torch.autograd.grad(loss, student, retain_graph=True)
    (second,) = torch.autograd.grad(loss, student)
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_backward_returns_the_stored_buffer_when_the_graph_is_freed(backend, reduction):
    """docs/design.md §8: forward+backward holds at most one logits-sized buffer, so the gradient
    returned is the stored one scaled in place, not a second allocation."""
    student, teacher = _logits((3, 2, 40), seed=16)
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 2.0, reduction)
    stored = loss.grad_fn.saved_tensors[0]
    go = torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)
    (grad,) = torch.autograd.grad(loss, student, go)
    assert grad.data_ptr() == stored.data_ptr()
    s64 = student.detach().double().requires_grad_(True)
    ref = kd_kl_loss_reference(s64, teacher.double(), 2.0, reduction)
    (expected,) = torch.autograd.grad(ref, s64, go.double())
    _close(grad, expected, torch.float32)


def test_no_grad_mode_and_non_contiguous(backend):
    student, teacher = _logits((5, 24), seed=13)
    with torch.no_grad():
        loss = kd_kl_loss(student.t(), teacher.t(), 1.0, "none")
    expected, _ = _oracle(student.t().contiguous(), teacher.t().contiguous(), 1.0, "none")
    _close(loss, expected, torch.float32)


def test_gradcheck_reference_float64():
    gen = torch.Generator().manual_seed(14)
    student = torch.randn(2, 2, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 2, 5, dtype=torch.float64, generator=gen)
    mask = torch.tensor([[True, False], [True, True]])
    for reduction in REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda s, r=reduction: kd_kl_loss_reference(s, teacher, 1.7, r, mask), (student,)
        )


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": torch.tensor(1.0)}, "temperature"),
        ({"student": torch.zeros(2, 5, dtype=torch.float64)}, "float32"),
        ({"teacher": torch.zeros(2, 5, dtype=torch.int64)}, "float32"),
        ({"teacher": torch.zeros(2, 6)}, "same shape"),
        ({"teacher": torch.zeros(2, 5, device="meta")}, "meta"),
        ({"student": torch.zeros(2, 0), "teacher": torch.zeros(2, 0)}, "non-empty"),
        ({"student": torch.zeros(()), "teacher": torch.zeros(())}, "non-empty"),
        ({"mask": torch.ones(2)}, "bool"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, "leading dims"),
        ({"mask": torch.ones(2, dtype=torch.bool, device="meta")}, "meta"),
    ],
)
def test_rejections(kwargs, match):
    args = {"student": torch.zeros(2, 5), "teacher": torch.zeros(2, 5), **kwargs}
    with pytest.raises(ValueError, match=match):
        kd_kl_loss(
            args.pop("student"),
            args.pop("teacher"),
            temperature=args.pop("temperature", 1.0),
            reduction=args.pop("reduction", "batchmean"),
            mask=args.pop("mask", None),
        )
