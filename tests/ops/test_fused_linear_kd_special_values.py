"""fused_linear_kd_loss on masked rows, non-finite values and fp16's range, against float64:
all rows masked, strided masks, an inf or NaN ``grad_output`` or hidden state on a masked row
(no gradient reaches it, nor the head through it), a non-finite scalar ``grad_output``, fp16
gradients under loss scaling (a GradScaler's default scale included) and a long chunk's fp16
weight gradient (no overflow), and an fp16 head's cap and scale beyond fp16's range."""

from __future__ import annotations

import pytest
import torch

from kasmina.ops import (
    fused_linear_kd_loss,
    fused_linear_kd_loss_reference,
    kd_kl_loss,
    kd_kl_loss_reference,
)
from tests.ops.fused_linear_kd_helpers import _close, _inputs, _oracle, _use_backend
from tests.ops.kd_helpers import DEVICE, KERNEL_WARNINGS, _gen

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE.type == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", "triton")


def test_all_rows_masked_gives_zero():
    h, w, b, _, _, _, tl, _ = _inputs((2, 3), 8, 20, torch.float32, seed=9)
    none = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "batchmean", "sum"):
        loss = fused_linear_kd_loss(h, w, tl, student_bias=b, reduction=reduction, mask=none)
        grads = torch.autograd.grad(loss, (h, w, b))
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_fp16_gradient_survives_loss_scaling():
    """A GradScaler-sized ``grad_output`` meets ``1/rows`` in fp32: the fp16 gradients are the
    float64 ones, not underflowed (they are computed unscaled, as for ``sum``)."""
    h, w, b, _, _, _, tl, _ = _inputs((64,), 8, 300, torch.float16, seed=11)
    loss = fused_linear_kd_loss(h, w, tl, student_bias=b, reduction="mean", chunk_rows=16)
    go = torch.tensor(1024.0)
    grads = torch.autograd.grad(loss, (h, w, b), go)
    _, expected = _oracle(h, w, b, tl, 1.0, "mean", grad_output=go)
    for got, want in zip(grads, expected, strict=True):
        assert (got != 0).float().mean() > 0.9
        _close(got, want, torch.float16, "fp16 gradient")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp16_hidden_gradient_takes_a_grad_scalers_default_scale(monkeypatch, backend, masked):
    """``reduction="sum"`` under a GradScaler's default scale, 65536, past fp16's 65504: the
    factor ``grad_output·scale`` multiplies the unscaled hidden gradient in fp32. A mask cast
    it to fp16 first, and every kept row's hidden gradient came out inf or NaN (the step
    skipped, the scale halved) where the true one is a few hundred."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    gen = _gen(13)
    h, w, b = (
        (torch.randn(*shape, generator=gen) * 0.1).half().requires_grad_()
        for shape in ((6, 8), (40, 8), (40,))
    )
    tl = (torch.randn(6, 40, generator=gen) * 0.1).half()
    mask = torch.tensor([True, True, False, True, True, True]) if masked else None
    loss = fused_linear_kd_loss(h, w, tl, student_bias=b, reduction="sum", mask=mask)
    go = torch.tensor(65536.0)
    grads = torch.autograd.grad(loss, (h, w, b), go)
    _, expected = _oracle(h, w, b, tl, 1.0, "sum", mask=mask, grad_output=go)
    for got, want, what in zip(grads, expected, ("hidden", "weight", "bias"), strict=True):
        assert want.abs().max() < 65504  # representable: only the factor overflowed fp16
        _close(got, want, torch.float16, f"fp16 {what} gradient")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp16_weight_gradient_of_a_long_chunk_does_not_overflow(monkeypatch, backend, reduction):
    """A chunk's weight gradient sums its rows: 256 rows of hidden 200 at T = 2 is ~102k for
    one column, over fp16's 65,504 (as 2,048 rows of hidden 20 are). Rounded to fp16 before
    any scaling, it was inf (so no loss scale could help, and every step was skipped).
    Per-column powers of two keep the product in range; the gradient is the float64 one."""
    _use_backend(monkeypatch, backend)
    g = _gen(21)
    rows, hidden, vocab = 256, 8, 16
    h = (torch.randn(rows, hidden, generator=g) * 0.1).to(DEVICE)
    h[:, 0] = 200.0
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).to(DEVICE)
    w[0, 0] = 1.0  # the student puts its mass on class 0
    t = torch.zeros(rows, vocab, device=DEVICE)
    t[:, 1] = 12.0  # the teacher on class 1
    h16, w16 = h.half().requires_grad_(), w.half().requires_grad_()
    loss = fused_linear_kd_loss(h16, w16, t.half(), temperature=2.0, reduction=reduction)
    go = None  # "none": a per-row grad_output of the batch mean's size; its product is in range
    if reduction == "none":
        go = ((torch.rand(loss.shape, generator=g) + 0.5) / rows).to(DEVICE)
    grads = torch.autograd.grad(loss, (h16, w16), go)
    _, expected = _oracle(h16, w16, None, t.half(), 2.0, reduction, grad_output=go)
    if reduction == "batchmean":  # the chunk's unscaled sum is over fp16's range
        assert float(expected[1].abs().max()) * rows > 65_504
    for got, want, what in zip(grads, expected, ("hidden", "weight"), strict=False):
        assert torch.isfinite(got).all(), what
        _close(got, want, torch.float16, f"fp16 {what} gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_masked_rows_non_finite_grad_output_reaches_no_gradient(monkeypatch, backend, dtype):
    """``reduction="none"`` with a padding row whose ``grad_output`` is inf or NaN: that row
    gets and gives nothing. An fp16 head sized its overflow guard's power-of-two scaling by the
    chunk's largest ``grad_output``, the masked row's inf included, and the whole weight
    gradient came out NaN."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    gen = _gen(41)
    h0, w0 = torch.randn(3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    teacher = torch.randn(3, 5, generator=gen).to(dtype)
    mask = torch.tensor([True, True, False])
    for bad in (float("inf"), float("nan")):
        h, w = h0.to(dtype).clone().requires_grad_(), w0.to(dtype).clone().requires_grad_()
        fused_linear_kd_loss(h, w, teacher, reduction="none", mask=mask).backward(
            torch.tensor([1.0, 0.5, bad])
        )
        h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref = kd_kl_loss_reference(h64 @ w64.t(), teacher.double(), 1.0, "none", mask)
        ref.backward(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
        assert torch.equal(h.grad[2], torch.zeros(4, dtype=dtype))
        _close(w.grad, w64.grad, dtype, f"weight gradient, {bad}")
        _close(h.grad, h64.grad, dtype, f"hidden gradient, {bad}")


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_masked_rows_non_finite_hidden_reaches_no_gradient(monkeypatch, backend, cap, reduction):
    """A padded position's hidden state that is NaN or inf (an fp16 overflow at a pad token),
    dropped by the mask: the head's weight gradient came out NaN everywhere (the row's zero
    logits gradient times its hidden state), and through a softcap its hidden gradient too
    (times the cap's derivative at its NaN logits). The oracle is the loss on the kept rows."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    gen = _gen(47)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    h0, w0 = torch.randn(2, 4, 6, generator=gen), torch.randn(7, 6, generator=gen) * 0.3
    teacher, b0 = torch.randn(2, 4, 7, generator=gen), torch.randn(7, generator=gen)
    for bad in (float("nan"), float("inf")):
        h0[~mask] = bad
        h, w, b = (t.clone().requires_grad_() for t in (h0, w0, b0))
        loss = fused_linear_kd_loss(
            h, w, teacher, student_bias=b, reduction=reduction, mask=mask, chunk_rows=3,
            temperature=2.0, student_softcap=cap,
        )  # fmt: skip
        loss.sum().backward()
        h64, w64, b64 = (t.double().requires_grad_() for t in (h0, w0, b0))
        kept = fused_linear_kd_loss_reference(
            h64[mask], w64, teacher.double()[mask], student_bias=b64, temperature=2.0,
            reduction=reduction, student_softcap=cap,
        )  # fmt: skip
        kept.sum().backward()
        assert torch.equal(h.grad[~mask], torch.zeros_like(h.grad[~mask])), bad
        _close(h.grad[mask], h64.grad[mask], torch.float32, f"hidden gradient, {bad}")
        _close(w.grad, w64.grad, torch.float32, f"weight gradient, {bad}")
        _close(b.grad, b64.grad, torch.float32, f"bias gradient, {bad}")


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_a_non_finite_scalar_grad_output_leaves_masked_rows_at_zero(monkeypatch, reduction, mode):
    """A scalar reduction's ``grad_output`` that is inf or NaN (an overflowed loss scale): the
    kept rows' gradients are non-finite, as they must be, and a masked row's is 0, as
    ``kd_kl_loss``'s is (its unscaled gradient 0 times inf made it NaN). The compiled path
    spends the gradients through its own op, so it is checked too."""
    monkeypatch.setenv("KASMINA_BACKEND", "reference")
    gen = _gen(43)
    h0, w0 = torch.randn(2, 3, 4, generator=gen), torch.randn(5, 4, generator=gen)
    teacher = torch.randn(2, 3, 5, generator=gen)
    mask = torch.tensor([[True, False, True], [False, True, True]])

    def step(h, w):
        return fused_linear_kd_loss(h, w, teacher, reduction=reduction, mask=mask)

    fn = step if mode == "eager" else torch.compile(step, fullgraph=True, backend="aot_eager")
    for bad in (float("inf"), float("nan")):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        fn(h, w).backward(torch.tensor(bad))
        h_ref = h0.clone().requires_grad_()
        kd_kl_loss(h_ref @ w0.t(), teacher, reduction=reduction, mask=mask).backward(
            torch.tensor(bad)
        )
        assert torch.equal(h.grad[~mask], torch.zeros(2, 4)), (bad, mode)
        assert torch.equal(h_ref.grad[~mask], torch.zeros(2, 4)), bad
        assert not torch.isfinite(h.grad[mask]).any(), bad
        assert not torch.isfinite(w.grad).any(), bad


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_strided_masks(triton_backend, reduction):
    """``mask[::2]`` and ``m[..., 0]`` (strided after ``reshape(-1)``) drop the right rows."""
    pairs = torch.tensor([[True, False], [False, True], [True, True]]).repeat(2, 1)
    for lead, mask in (
        ((6,), torch.tensor([True, False] * 6)[::2]),
        ((2, 3), pairs.reshape(2, 3, 2)[..., 0]),
    ):
        assert mask.reshape(-1).stride() != (1,)
        h, w, b, _, _, _, tl, _ = _inputs(lead, 8, 11, torch.float32, seed=62)
        loss = fused_linear_kd_loss(
            h, w, tl, student_bias=b, temperature=1.5, reduction=reduction, mask=mask,
            chunk_rows=4,
        )  # fmt: skip
        go = torch.randn(loss.shape, generator=_gen(63))
        got = torch.autograd.grad(loss, (h, w, b), go)
        exp_loss, want = _oracle(h, w, b, tl, 1.5, reduction, mask.contiguous(), go)
        _close(loss, exp_loss, torch.float32, "loss")
        for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
            _close(x, y, torch.float32, what)


def test_an_fp16_head_takes_a_cap_and_a_scale_beyond_fp16s_range() -> None:
    """The scale and the cap are float32 scalars to the kernels whatever the logits' dtype: a
    cap of 1e5 (no cap, in effect) and a scale of 3e-5 on an fp16 head are no error."""
    g = _gen(21)
    hidden = torch.randn(2, 3, 5, generator=g).half()
    weight = torch.randn(10, 5, generator=g).half()
    teacher = torch.randn(2, 3, 10, generator=g)
    for options in ({"student_softcap": 1e5}, {"student_logit_scale": 3e-5}):
        loss = fused_linear_kd_loss(hidden, weight, teacher, **options)
        assert torch.isfinite(loss)
