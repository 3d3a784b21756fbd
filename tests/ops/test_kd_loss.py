"""kd_kl_loss: the Triton kernels (through the interpreter on a CPU) and the CPU path against an
independent float64 oracle built on ``F.kl_div``: reductions, masks, temperatures, every dtype,
odd vocabularies, strided and expanded views, ``grad_output`` scaling, the fp16 gradient error
against eager PyTorch's, -inf/NaN handling, memory structure and input rejection.

Inputs are fresh random tensors (a seed per case, so a failure reproduces). Kernel outputs are
poisoned with NaN before the launch, so an element the kernel forgets to write fails. On a
machine with CUDA every test runs on the GPU (the compiled kernels); on a CPU the Triton backend
runs through the interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kasmina.kernels.kd_loss as kernels
import kasmina.kernels.rows as row_addressing
import pytest
import torch
import torch.nn.functional as F

from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from kasmina.ops.kd_layout import grad_strides
from kasmina.ops.kd_loss import REDUCTIONS as OP_REDUCTIONS
from kasmina.ops.kd_loss import (
    _host_scale,
    kd_backward_reference,
    kd_forward_reference,
)
from tests.ops.bench_smoke import gpu_bench_smoke_rows
from tests.ops.tolerances import DTYPES, tol

REDUCTIONS = ("none", "sum", "mean", "batchmean")
NINF = float("-inf")
# The kernels compute -inf - -inf = NaN, log2(0) = -inf and exp2 overflows to inf on purpose
# (masked lanes, all--inf rows; see kasmina.kernels.kd_loss); the interpreter's numpy warns.
pytestmark = [
    pytest.mark.filterwarnings(f"ignore:{what} encountered:RuntimeWarning")
    for what in ("invalid value", "divide by zero", "overflow")
]


# CUDA when there is one (the compiled kernels; how perf/gpu_check.sh runs this file), else the
# CPU, where the Triton backend runs through the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def on_device():
    with DEVICE:  # every factory call in a test allocates on DEVICE
        yield


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KASMINA_BACKEND", request.param)
    return request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def _logits(shape, dtype=torch.float32, seed=0, scale=3.0):
    gen = _gen(seed)
    student = (torch.randn(shape, generator=gen) * scale).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return student, teacher


def _oracle(student, teacher, temperature, reduction, mask=None, grad_output=None):
    """float64 ``T²·F.kl_div`` on log-softmaxed rows: ``(loss, d loss / d student)``, the
    gradient taken against ``grad_output`` (ones by default)."""
    vocab = student.shape[-1]
    s64 = student.detach().double().requires_grad_(True)
    log_ps = torch.log_softmax(s64.reshape(-1, vocab) / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher.double().reshape(-1, vocab) / temperature, dim=-1)
    rows = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    rows = rows * temperature**2
    kept = rows.numel()
    if mask is not None:
        rows = torch.where(mask.reshape(-1), rows, 0.0)
        kept = int(mask.sum())
    if reduction == "none":
        loss = rows.reshape(student.shape[:-1])
    elif reduction == "sum":
        loss = rows.sum()
    elif reduction == "mean":
        loss = rows.sum() / (max(kept, 1) * vocab)
    else:
        loss = rows.sum() / max(kept, 1)
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, s64, go)
    return loss.detach(), grad


def _close(actual, expected, dtype):
    """Per-dtype tolerance, with ``atol`` relative to the largest expected magnitude (mean
    reductions make gradients ~1e-8, where an absolute atol would prove nothing)."""
    t = tol(dtype)
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=t["rtol"], atol=t["atol"] * max(scale, 1e-30)
    )


def _strided_pair(batch, length, vocab, dtype, teacher_dtype, seed):
    """``logits[:, :-1]`` views of fresh ``[batch, length + 1, vocab]`` logits (the LM shift),
    the student's base requiring grad."""
    gen = _gen(seed)
    base = (torch.randn(batch, length + 1, vocab, generator=gen) * 3).to(dtype)
    base.requires_grad_(True)
    teacher = (torch.randn(batch, length + 1, vocab, generator=gen) * 3).to(teacher_dtype)
    return base, base[:, :-1], teacher[:, :-1]


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    ("dtype", "reduction", "masked", "vocab"),
    [
        (torch.float32, "none", True, 257),
        (torch.float32, "sum", False, 1001),
        (torch.float32, "mean", True, 1000),
        (torch.float32, "batchmean", False, 5),
        (torch.float16, "batchmean", True, 1001),
        (torch.float16, "none", False, 257),
        (torch.bfloat16, "mean", False, 1001),
        (torch.bfloat16, "sum", True, 64),
    ],
)
def test_kernels_match_float64_on_strided_rows(dtype, reduction, masked, vocab):
    """Forward and backward launchers on ``logits[:, :-1]`` (and a teacher starting one element
    past a 16-byte boundary), block 64 so rows take a head, several unmasked body steps and a
    masked tail; a per-row ``grad_output`` for ``none``; every output poisoned first."""
    seed = 100 + vocab + len(reduction)
    gen = _gen(seed)
    full_s = (torch.randn(2, 4, vocab, generator=gen) * 3).to(dtype)
    full_t = (torch.randn(2, 4, vocab + 1, generator=gen) * 3).to(dtype)
    student, teacher = full_s[:, :-1], full_t[:, :-1, 1:]
    mask = torch.rand(2, 3, generator=gen) > 0.4 if masked else None
    rows = 6
    loss_rows = torch.full((rows,), float("nan"))
    stats = torch.full((2, 3, 4), float("nan"))
    loss, stats_out, scale = kernels.kd_forward(
        student, teacher, mask, 2.0, reduction, True,
        loss_rows_out=loss_rows, stats_out=stats, block_v=64,
    )  # fmt: skip
    assert stats_out is stats and loss.dtype == torch.float32
    go = torch.randn(loss.shape, generator=gen) if reduction == "none" else torch.tensor(1.7)
    out = torch.full_like(student, float("nan"))
    grad = kernels.kd_backward(
        student, teacher, mask, stats, scale, go, 2.0, reduction, out=out, block_v=64
    )
    assert grad is out and grad.dtype == dtype
    exp_loss, exp_grad = _oracle(student, teacher, 2.0, reduction, mask, go)
    _close(loss, exp_loss, dtype)
    _close(grad, exp_grad, dtype)
    if mask is not None:
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # written, not NaN
        assert torch.equal(loss_rows.view(2, 3)[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize(
    ("shape", "reduction"),
    [((1, 1), "batchmean"), ((3, 1), "none"), ((1, 17), "sum"), ((2, 3, 33), "none")],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_on_odd_shapes_down_to_one_element(
    launched: list[str], dtype: torch.dtype, shape: tuple[int, ...], reduction: str
) -> None:
    """One logit (a KL of 0 and a zero gradient, written), one row, and vocabularies below,
    at and past the block (16: head, body and tail), fresh random per case, outputs poisoned,
    every dtype, against the float64 oracle."""
    student, teacher = _logits(shape, dtype, seed=sum(shape) + DTYPES.index(dtype))
    rows = student[..., 0].numel()
    loss_rows = torch.full((rows,), float("nan"))
    stats = torch.full((*shape[:-1], 4), float("nan"))
    loss, _, scale = kernels.kd_forward(
        student, teacher, None, 1.5, reduction, True,
        loss_rows_out=loss_rows, stats_out=stats, block_v=16,
    )  # fmt: skip
    go = torch.rand(loss.shape, generator=_gen(rows)) + 0.5
    out = torch.full_like(student, float("nan"))
    grad = kernels.kd_backward(
        student, teacher, None, stats, scale, go, 1.5, reduction, out=out, block_v=16
    )
    exp_loss, exp_grad = _oracle(student, teacher, 1.5, reduction, None, go)
    _close(loss, exp_loss, dtype)
    _close(grad, exp_grad, dtype)
    if shape[-1] == 1:  # a single logit: both distributions are 1, nothing to learn
        assert not loss_rows.any() and not grad.any()
    assert launched == ["_kd_fwd_kernel", "_kd_bwd_kernel"]


def test_merged_reductions_match_single_ones():
    """The compiled kernels merge the per-row lane reductions into tuple reductions; the
    interpreter runs them element by element, so this checks them on 16 lanes only."""
    student, teacher = _logits((3, 50), seed=7)
    teacher[1, :20] = NINF
    results = [
        kernels.kd_forward(student, teacher, None, 1.5, "none", True, block_v=16, merged=m)
        for m in (False, True)
    ]
    for a, b in zip(results[0][:2], results[1][:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


def test_large_vocab_row_through_triton(triton_backend):
    """V >= 131,072 (odd) streams through several interpreter steps."""
    vocab = 131_072 + 77
    student, teacher = _logits((2, vocab), seed=2)
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 1.5, "batchmean")
    loss.backward()
    exp_loss, exp_grad = _oracle(student, teacher, 1.5, "batchmean")
    _close(loss, exp_loss, torch.float32)
    _close(student.grad, exp_grad, torch.float32)


def test_no_statistics_without_grad(backend):
    student, teacher = _logits((4, 40), seed=4)
    forward = kernels.kd_forward if backend == "triton" else kd_forward_reference
    for reduction in ("mean", "sum"):
        loss, stats, scale = forward(student, teacher, None, 1.0, reduction, False)
        assert stats.numel() == 0 and scale.numel() == 0
    _close(loss, _oracle(student, teacher, 1.0, "sum")[0], torch.float32)
    mask = torch.tensor([True, False, True, True])
    _, stats, scale = forward(student, teacher, mask, 1.0, "batchmean", True)
    assert stats.shape == (4, 4) and scale.shape == () and scale.item() == pytest.approx(1 / 3)


def test_launcher_rejections():
    student, teacher = _logits((3, 8), seed=5)
    loss, stats, scale = kernels.kd_forward(student, teacher, None, 1.0, "none", True)
    with pytest.raises(ValueError, match="grad_output"):
        kernels.kd_backward(student, teacher, None, stats, scale, torch.ones(4), 1.0, "none")
    with pytest.raises(ValueError, match="grad_output"):
        kernels.kd_backward(student, teacher, None, stats, scale, torch.ones(3), 1.0, "sum")
    with pytest.raises(ValueError, match="stats"):
        kernels.kd_backward(student, teacher, None, stats[:2], scale, torch.ones(()), 1.0, "sum")
    with pytest.raises(ValueError, match="reduction"):
        kernels.kd_forward(student, teacher, None, 1.0, "avg", True)


def test_launcher_and_op_agree_on_reductions_and_host_scale() -> None:
    """The launcher imports nothing of kasmina and the op's CPU path loads no Triton
    (docs/design.md §1), so each keeps the reduction names and the host part of the scale:
    the two copies must not drift apart."""
    assert kernels.REDUCTIONS == OP_REDUCTIONS
    for reduction in OP_REDUCTIONS:
        for rows, vocab, masked in [(0, 1, False), (1, 7, True), (6, 1001, False), (6, 3, True)]:
            expected = _host_scale(reduction, rows, vocab, masked)
            assert kernels.host_scale(reduction, rows, vocab, masked) == expected


# --------------------------------------------------------------------------- layouts


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


# --------------------------------------------------------------------------- op + autograd


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


def test_no_grad_mode_and_transposed_logits(backend):
    student, teacher = _logits((5, 24), seed=13)
    with torch.no_grad():
        loss = kd_kl_loss(student.t(), teacher.t(), 1.0, "none")
    expected, _ = _oracle(student.t().contiguous(), teacher.t().contiguous(), 1.0, "none")
    _close(loss, expected, torch.float32)


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


# --------------------------------------------------------------------------- compile


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


# --------------------------------------------------------------------------- PTX


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_odd_vocab_compiles_to_vector_loads_without_loop_barriers(tmp_path: Path):
    """Compiled for sm_90 (no GPU needed) as a launch with V = 50,257 specialises: the body
    loads 16 bytes per instruction, and no loop of the forward kernel holds a barrier (the
    old kernel had ten per step); the lanes are merged once per row, after the loops."""
    script = textwrap.dedent(
        """
        import json, re, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import kasmina.kernels.kd_loss as K
        names = K._kd_fwd_kernel.arg_names
        sig = {n: "i32" for n in names}
        sig.update(s_ptr="*bf16", t_ptr="*bf16", mask_ptr="*i1", loss_ptr="*fp32",
                   stats_ptr="*fp32", k="fp32", loss_factor="fp32")
        const = dict(HAS_MASK=False, WRITE_STATS=True, ALIGN_S=True, ALIGN_T=True, VEC=8,
                     BLOCK_V=K.FWD_BLOCK_V, MERGED=True)
        sig.update({n: "constexpr" for n in const})
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in ("s_ptr", "t_ptr", "mask_ptr", "loss_ptr", "stats_ptr")}
        src = ASTSource(K._kd_fwd_kernel, sig, constexprs=const, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": K.NUM_WARPS}).asm["ptx"]
        lines = ptx.splitlines()
        labels = {l.split(":")[0]: i for i, l in enumerate(lines) if l.startswith("$L__BB")}
        loops = []
        for i, line in enumerate(lines):
            target = re.search(r"bra(?:\\.uni)?\\s+(\\$L__BB\\w+);", line)
            if target and labels.get(target.group(1), i + 1) < i:
                loops.append("bar.sync" in "\\n".join(lines[labels[target.group(1)]:i]))
        print(json.dumps({"v4": "ld.global.v4" in ptx, "loops": loops,
                          "bars": ptx.count("bar.sync")}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"ptxas unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["v4"]
    assert facts["loops"] and not any(facts["loops"])  # loops found, none with a barrier
    assert 0 < facts["bars"] <= 8


def test_gpu_bench_kd_rows_run_in_smoke_mode(tmp_path: Path):
    """``perf/bench_gpu.py --smoke``: the KD rows of the GPU table, at tiny sizes on the CPU
    (the kernels interpreted), build, check against float64 and write their JSON, so a bug in
    the benchmark shows without a GPU."""
    rows = gpu_bench_smoke_rows("kd_kl_loss", tmp_path)
    assert {r["impl"] for r in rows} == {"kasmina", "eager"}


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
        ({"temperature": 1e20}, "temperature must be within"),  # T² overflowed fp32: inf, NaN
        ({"temperature": 1e-40}, "temperature must be within"),  # log2(e)/T overflowed fp32
        ({"temperature": 1e-22}, "temperature must be within"),  # T² was 0 in fp32: loss 0
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
    # The cases are built at import, on the CPU: each moves to DEVICE (meta stays meta), so a
    # GPU run tests the same rejection and not a device mismatch.
    kwargs = {
        k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
        for k, v in kwargs.items()
    }
    zeros = torch.zeros(2, 5, device=DEVICE)
    args = {"student": zeros, "teacher": zeros, **kwargs}
    if "reduction" in kwargs or "temperature" in kwargs:  # the oracle refuses them too
        with pytest.raises(ValueError, match=match):
            kd_kl_loss_reference(torch.zeros(2, 5), torch.zeros(2, 5), **kwargs)
    with pytest.raises(ValueError, match=match):
        kd_kl_loss(
            args.pop("student"),
            args.pop("teacher"),
            temperature=args.pop("temperature", 1.0),
            reduction=args.pop("reduction", "batchmean"),
            mask=args.pop("mask", None),
        )


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
