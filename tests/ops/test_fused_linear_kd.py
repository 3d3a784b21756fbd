"""fused_linear_kd_loss against an independent float64 oracle (plain matmul, log-softmax KL,
autograd) for the loss and the gradients of hidden states, weight and bias: every reduction,
masks, temperatures, fp32/bf16/fp16, teacher as logits and as a head, logit scale and soft-cap,
rows that are not a multiple of the chunk, odd vocabularies, non-contiguous inputs; the CPU path
and the Triton kernels (through the interpreter on a CPU); the custom ops under opcheck and
``torch.compile(fullgraph=True)``; and the memory claim: no ``[rows, V]`` tensor is ever
allocated or saved for the backward."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_leaves

import kasmina.ops.fused_linear_kd as flkd
import kasmina.ops.fused_linear_kd_chunks as chunks
from kasmina.ops import (
    fused_linear_kd_loss,
    fused_linear_kd_loss_reference,
    kd_kl_loss,
    kd_kl_loss_reference,
)
from tests.ops.bench_smoke import gpu_bench_smoke_rows
from tests.ops.tolerances import tol

REDUCTIONS = ("none", "sum", "mean", "batchmean")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.filterwarnings(f"ignore:{what} encountered:RuntimeWarning")
    for what in ("invalid value", "divide by zero", "overflow")
]


@pytest.fixture(autouse=True)
def on_device():
    with DEVICE:
        yield


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE.type == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", "triton")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


# --------------------------------------------------------------------------- oracle


def _oracle(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: Tensor, temperature: float,
    reduction: str, mask: Tensor | None = None, grad_output: Tensor | None = None,
    scale: float | None = None, cap: float | None = None,
) -> tuple[Tensor, list[Tensor | None]]:  # fmt: skip
    """float64: ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` of ``s = cap·tanh(scale·(hW^T+b)/cap)``,
    written out (no kasmina code); returns the loss and d loss/d (hidden, weight, bias)."""
    leaves = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    vocab = weight.shape[0]
    z = leaves[0].reshape(hidden.shape[:-1].numel(), hidden.shape[-1]) @ leaves[1].t()
    if b64 is not None:
        z = z + b64
    if scale is not None:
        z = z * scale
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    log_ps = torch.log_softmax(z / temperature, -1)
    log_pt = torch.log_softmax(teacher.double().reshape(-1, vocab) / temperature, -1)
    rows = (log_pt.exp() * (log_pt - log_ps)).sum(-1) * temperature**2
    kept = rows.numel()
    if mask is not None:
        rows = torch.where(mask.reshape(-1), rows, 0.0)
        kept = int(mask.sum())
    loss = {
        "none": lambda: rows.reshape(hidden.shape[:-1]),
        "sum": rows.sum,
        "mean": lambda: rows.sum() / (max(kept, 1) * vocab),
        "batchmean": lambda: rows.sum() / max(kept, 1),
    }[reduction]()
    go = torch.ones_like(loss) if grad_output is None else grad_output.double()
    wrt = [*leaves, *([b64] if b64 is not None else [])]
    grads = list(torch.autograd.grad(loss, wrt, go))
    return loss.detach(), grads + ([None] if b64 is None else [])


def _teacher_logits_of(th: Tensor, tw: Tensor, tb: Tensor | None, scale, cap) -> Tensor:
    z = th.double() @ tw.double().t()
    if tb is not None:
        z = z + tb.double()
    if scale is not None:
        z = z * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def _close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    """Per-dtype tolerance, ``atol`` relative to the largest expected magnitude."""
    t = tol(dtype)
    size = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=t["rtol"], atol=t["atol"] * max(size, 1e-30),
        msg=lambda m: f"{what}: {m}",
    )  # fmt: skip


def _inputs(lead, hidden, vocab, dtype, seed, *, bias=True, t_hidden=6):
    g = _gen(seed)
    h = torch.randn(*lead, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 2).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.5).to(dtype).requires_grad_() if bias else None
    th = torch.randn(*lead, t_hidden, generator=g).to(dtype)
    tw = (torch.randn(vocab, t_hidden, generator=g) / t_hidden**0.5 * 2).to(dtype)
    tb = (torch.randn(vocab, generator=g) * 0.5).to(dtype)
    tl = (torch.randn(*lead, vocab, generator=g) * 2).to(dtype)
    mask = torch.rand(lead, generator=g) > 0.3
    return h, w, b, th, tw, tb, tl, mask


def _check_case(dtype, reduction, temperature, masked, teacher_kind, scale, cap, lead, vocab,
                chunk, seed=0, bias=True):  # fmt: skip
    h, w, b, th, tw, tb, tl, mask = _inputs(lead, 12, vocab, dtype, seed, bias=bias)
    m = mask if masked else None
    kwargs = dict(
        temperature=temperature, reduction=reduction, mask=m, chunk_rows=chunk,
        student_bias=b, student_logit_scale=scale, student_softcap=cap,
    )  # fmt: skip
    if teacher_kind == "head":
        kwargs.update(
            teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, teacher_logit_scale=scale,
            teacher_softcap=cap,
        )  # fmt: skip
        loss = fused_linear_kd_loss(h, w, **kwargs)
        teacher = _teacher_logits_of(th, tw, tb, scale, cap)
    else:
        loss = fused_linear_kd_loss(h, w, tl, **kwargs)
        teacher = tl
    assert loss.dtype == torch.float32
    go = torch.rand(loss.shape, generator=_gen(seed + 1)) + 0.5
    wrt = [x for x in (h, w, b) if x is not None]
    grads = torch.autograd.grad(loss, wrt, go)
    exp_loss, exp_grads = _oracle(h, w, b, teacher, temperature, reduction, m, go, scale, cap)
    _close(loss, exp_loss, dtype, "loss")
    for name, got, want in zip(("hidden", "weight", "bias"), grads, exp_grads, strict=False):
        assert got.dtype == dtype and got.shape == want.shape
        _close(got, want, dtype, f"grad {name}")
    assert th.grad is None and tw.grad is None and tl.grad is None


# --------------------------------------------------------------------------- value and gradients


CASES = [
    # dtype, reduction, T, masked, teacher, scale, cap, lead, vocab, chunk
    (torch.float32, "none", 1.0, False, "logits", None, None, (3, 5), 37, 4),
    (torch.float32, "sum", 2.0, True, "head", None, None, (13,), 50, 5),
    (torch.float32, "mean", 0.7, True, "logits", 0.5, None, (2, 7), 129, 3),
    (torch.float32, "batchmean", 2.0, False, "head", None, 4.0, (4, 3), 37, 5),
    (torch.float32, "batchmean", 1.5, True, "head", 0.25, 3.0, (9,), 33, 4),
    (torch.float32, "none", 3.0, True, "head", 1.5, 2.5, (2, 5), 45, 3),
    (torch.float32, "sum", 1.0, False, "logits", None, 6.0, (11,), 21, 16),
    (torch.bfloat16, "batchmean", 2.0, True, "head", 0.5, 3.0, (3, 5), 37, 4),
    (torch.bfloat16, "none", 1.0, False, "logits", None, None, (7,), 50, 3),
    (torch.bfloat16, "mean", 2.0, True, "logits", None, 5.0, (2, 4), 129, 5),
    (torch.float16, "sum", 2.0, True, "head", None, None, (3, 5), 37, 4),
    (torch.float16, "batchmean", 1.0, False, "logits", 0.5, 4.0, (10,), 50, 3),
    (torch.float16, "none", 2.0, True, "head", None, 3.0, (2, 3), 33, 2),
]


@pytest.mark.parametrize(
    ("dtype", "reduction", "temperature", "masked", "teacher", "scale", "cap", "lead", "vocab",
     "chunk"),
    CASES,
)  # fmt: skip
def test_matches_float64_oracle(dtype, reduction, temperature, masked, teacher, scale, cap, lead,
                                vocab, chunk):  # fmt: skip
    """CPU path (CUDA: the kernels): loss and all three gradients against float64, with a
    per-row or scalar ``grad_output``; the chunk never divides the rows, and no V is a multiple
    of 16."""
    _check_case(dtype, reduction, temperature, masked, teacher, scale, cap, lead, vocab, chunk)


@pytest.mark.parametrize(
    ("dtype", "reduction", "teacher", "cap"),
    [
        (torch.float32, "batchmean", "head", 3.0),
        (torch.float32, "none", "logits", None),
        (torch.bfloat16, "mean", "head", None),
        (torch.float16, "sum", "logits", 4.0),
    ],
)
def test_triton_kernels_match_float64_oracle(
    triton_backend, launched, dtype, reduction, teacher, cap
):
    """The same through the KD kernels (the interpreter on a CPU)."""
    _check_case(dtype, reduction, 2.0, True, teacher, 0.5, cap, (2, 5), 37, 3, seed=5)
    assert {"_kd_fwd_kernel", "_kd_bwd_kernel"} <= set(launched)  # not the chunked CPU path


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_a_teacher_made_under_inference_mode_is_accepted(monkeypatch, path):
    """Teacher logits, or a teacher's hidden states, made under ``torch.inference_mode()`` are
    inference tensors, which autograd refuses to save: the op takes them all the same."""
    if path == "triton" and DEVICE.type == "cpu":
        if __import__("os").environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", path)
    g = _gen(21)
    hidden = torch.randn(2, 3, 8, generator=g)
    weight = torch.randn(13, 8, generator=g, requires_grad=True)
    t_weight = torch.randn(13, 8, generator=g)
    with torch.inference_mode():
        t_hidden = hidden.clone() + 0.5
        t_logits = t_hidden @ t_weight.T
    runs = []
    for teacher in ({"teacher_logits": t_logits}, {"teacher_hidden": t_hidden}):
        for frozen in (True, False):
            kwargs = dict(teacher)
            if not frozen:
                kwargs = {k: v.clone() for k, v in kwargs.items()}
            if "teacher_hidden" in kwargs:
                kwargs["teacher_weight"] = t_weight
            h = hidden.clone().requires_grad_(True)
            loss = fused_linear_kd_loss(h, weight, temperature=2.0, **kwargs)
            (dh,) = torch.autograd.grad(loss, [h])
            runs.append((loss.detach(), dh))
    for got in runs[1:]:
        torch.testing.assert_close(got, runs[0], rtol=1e-5, atol=1e-6)


def test_no_bias_and_one_chunk_for_everything():
    _check_case(
        torch.float32, "batchmean", 2.0, True, "head", None, None, (6,), 40, 100, bias=False
    )


def test_equals_kd_kl_loss_of_materialised_logits():
    """The definition, at fp32 tolerance: kd_kl_loss(h @ W.T + b, t) and autograd."""
    h, w, b, _, _, _, tl, mask = _inputs((4, 6), 16, 70, torch.float32, seed=3)
    for reduction in REDUCTIONS:
        chunk = np.int64(5) if reduction == "sum" else 5  # NumPy's integers count too
        loss = fused_linear_kd_loss(
            h, w, tl, student_bias=b, temperature=1.7, reduction=reduction, mask=mask,
            chunk_rows=chunk,
        )  # fmt: skip
        go = torch.rand(loss.shape, generator=_gen(4)) + 0.5
        grads = torch.autograd.grad(loss, (h, w, b), go)
        ref = kd_kl_loss(h @ w.t() + b, tl, temperature=1.7, reduction=reduction, mask=mask)
        ref_grads = torch.autograd.grad(ref, (h, w, b), go)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path", ["reference", "triton"])
def test_numpy_and_fraction_temperatures_equal_the_float(monkeypatch, path):
    """A NumPy float32 temperature reached the Triton launch as it was, which refuses it
    ("cannot convert ... numpy.float32"); the float it equals is what every path takes."""
    if path == "triton" and DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", path)
    h, w, b, _, _, _, tl, _ = _inputs((3, 4), 8, 19, torch.float32, seed=6)
    want = fused_linear_kd_loss(h, w, tl, student_bias=b, temperature=1.5)
    for temperature in (np.float32(1.5), np.float64(1.5), Fraction(3, 2)):
        got = fused_linear_kd_loss(h, w, tl, student_bias=b, temperature=temperature)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_non_contiguous_hidden_and_shifted_teacher_logits():
    """A transposed hidden view and ``logits[:, :-1]`` teacher logits (not viewable as
    ``[rows, V]``: gathered one chunk at a time); gradients keep the hidden's shape."""
    g = _gen(7)
    hidden = torch.randn(2, 6, 10, generator=g, requires_grad=True)
    view = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # same values, strided layout
    assert not view.is_contiguous()
    w = torch.randn(41, 10, generator=g, requires_grad=True)
    full_t = torch.randn(2, 7, 41, generator=g) * 2
    teacher = full_t[:, :-1]
    assert not teacher.is_contiguous()
    loss = fused_linear_kd_loss(view, w, teacher, temperature=2.0, chunk_rows=5)
    gh, gw = torch.autograd.grad(loss, (hidden, w))
    exp, (eh, ew, _) = _oracle(hidden, w, None, teacher, 2.0, "batchmean")
    _close(loss, exp, torch.float32, "loss")
    _close(gh, eh, torch.float32, "hidden")
    _close(gw, ew, torch.float32, "weight")


def test_frozen_head_and_frozen_hidden():
    """Only what requires grad gets a gradient (and the frozen parts cost nothing)."""
    h, w, b, th, tw, _, _, mask = _inputs((3, 4), 8, 30, torch.float32, seed=8)
    w.requires_grad_(False)
    b.requires_grad_(False)
    loss = fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, student_bias=b,
                                mask=mask, chunk_rows=5)  # fmt: skip
    (gh,) = torch.autograd.grad(loss, h)
    _, (eh, _, _) = _oracle(h, w, b, _teacher_logits_of(th, tw, None, None, None), 1.0,
                            "batchmean", mask)  # fmt: skip
    _close(gh, eh, torch.float32, "hidden")
    h2 = h.detach()
    w.requires_grad_(True)
    loss = fused_linear_kd_loss(h2, w, teacher_hidden=th, teacher_weight=tw, chunk_rows=4)
    loss.backward()
    assert w.grad is not None and h2.grad is None


def test_all_rows_masked_gives_zero():
    h, w, b, _, _, _, tl, _ = _inputs((2, 3), 8, 20, torch.float32, seed=9)
    none = torch.zeros(2, 3, dtype=torch.bool)
    for reduction in ("mean", "batchmean", "sum"):
        loss = fused_linear_kd_loss(h, w, tl, student_bias=b, reduction=reduction, mask=none)
        grads = torch.autograd.grad(loss, (h, w, b))
        assert loss.item() == 0.0
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


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


@pytest.mark.parametrize("reduction", ["sum", "batchmean"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_1d_hidden_is_one_row(monkeypatch, backend, reduction):
    """A 1-D ``hidden`` (one row, as the forward takes it) gets the gradient of that row: its
    scalar factor shaped for a 2-D gradient raised in the backward."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    h, w, b, _, _, _, tl, _ = _inputs((), 8, 24, torch.float32, seed=17)
    grads = torch.autograd.grad(
        fused_linear_kd_loss(h, w, tl, student_bias=b, reduction=reduction), (h, w, b)
    )
    rows = [x.detach()[None].requires_grad_() for x in (h,)] + [w, b]
    want = torch.autograd.grad(
        fused_linear_kd_loss(rows[0], w, tl[None], student_bias=b, reduction=reduction),
        (rows[0], w, b),
    )
    assert grads[0].shape == h.shape
    for got, expected in zip(grads, (want[0][0], want[1], want[2]), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


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


@pytest.mark.parametrize("option", ["teacher_logit_scale", "teacher_softcap"])
def test_teacher_head_options_with_teacher_logits_are_refused(option):
    """A teacher's scale and cap shape its head's logits: with ``teacher_logits`` they were
    silently ignored (the loss of the uncapped teacher), by the op, its oracle and
    ``StaticKDLoss`` alike."""
    from kasmina.kd.loss import StaticKDLoss

    h, w, _, _, _, _, tl, _ = _inputs((4,), 8, 30, torch.float32, seed=22)
    for call in (fused_linear_kd_loss, fused_linear_kd_loss_reference):
        with pytest.raises(ValueError, match="apply to a teacher head"):
            call(h, w, tl, **{option: 2.0})
    with pytest.raises(ValueError, match="apply to a teacher head"):
        StaticKDLoss(**{option: 2.0})(h, tl, student_weight=w)


def test_default_chunk_rows_follows_the_budget(monkeypatch: pytest.MonkeyPatch):
    """docs/design.md §2: the device's budget over the per-row scratch, a multiple of 64."""
    assert chunks.default_chunk_rows(10**6, 128_256, torch.bfloat16, torch.bfloat16) == 640
    assert chunks.default_chunk_rows(10**6, 128_256, torch.bfloat16) == 1024
    assert chunks.default_chunk_rows(10, 128_256, torch.bfloat16) == 10
    assert chunks.default_chunk_rows(10**6, 10**9, torch.float32, device_type="cpu") == 1
    assert chunks.default_chunk_rows(10**6, 32_000, torch.float32, device_type="cpu") == 64
    per_row = 200 * (2 * 4 + 4 + (chunks.CPU_SCRATCH_BYTES if DEVICE.type != "cuda" else 0))
    budget = "DEFAULT_CHUNK_BYTES" if DEVICE.type == "cuda" else "DEFAULT_CPU_CHUNK_BYTES"
    monkeypatch.setattr(chunks, budget, 5 * per_row)
    calls: list[int] = []
    forward = chunks.kd_forward_impl

    def spy(student, *args):
        calls.append(student.shape[0])
        return forward(student, *args)

    monkeypatch.setattr(chunks, "kd_forward_impl", spy)
    h, w, _, th, tw, _, _, _ = _inputs((12,), 8, 200, torch.float32, seed=12)
    fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw)
    assert calls == [5, 5, 2]


# --------------------------------------------------------------------------- gradcheck


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
def test_compiles_with_dynamic_shapes(monkeypatch, backend):
    """``torch.compile(fullgraph=True, dynamic=True)``: a float argument may be traced as a
    ``SymFloat`` (the default ``temperature`` is), so the checks take no ``math.isfinite``; loss
    and gradients equal the float64 oracle's for two batch sizes."""
    _use_backend(monkeypatch, backend)
    torch._dynamo.reset()

    def step(h, w, b, t):  # the default temperature (1.0)
        return fused_linear_kd_loss(h, w, t, student_bias=b, chunk_rows=4)

    fn = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows, seed in ((5, 62), (7, 63)):
        h, w, b, _, _, _, tl, _ = _inputs((rows,), 8, 11, torch.float32, seed=seed)
        loss = fn(h, w, b, tl)
        got = torch.autograd.grad(loss, (h, w, b))
        want_loss, want = _oracle(h, w, b, tl, 1.0, "batchmean")
        _close(loss, want_loss, torch.float32, "loss")
        for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
            _close(x, y, torch.float32, what)
    torch._dynamo.reset()


def test_a_symbolic_chunk_rows_compiles_fullgraph(monkeypatch):
    """``chunk_rows`` derived from a dynamic batch, or an int argument that changes between
    calls (TorchDynamo makes it symbolic), failed a fullgraph compile: the check's ``getattr``
    probe cannot be traced on a ``SymInt``. Loss and gradients equal the oracle's."""
    _use_backend(monkeypatch, "reference")
    torch._dynamo.reset()

    def halves(h, w, b, t):
        return fused_linear_kd_loss(h, w, t, student_bias=b, chunk_rows=h.shape[0] // 2)

    def given(h, w, b, t, c):
        return fused_linear_kd_loss(h, w, t, student_bias=b, chunk_rows=c)

    by_shape = torch.compile(halves, fullgraph=True, backend="aot_eager")
    by_argument = torch.compile(given, fullgraph=True, backend="aot_eager")
    for rows, seed in ((6, 70), (8, 71)):
        h, w, b, _, _, _, tl, _ = _inputs((rows,), 8, 11, torch.float32, seed=seed)
        torch._dynamo.mark_dynamic(h, 0)
        torch._dynamo.mark_dynamic(tl, 0)
        want_loss, want = _oracle(h, w, b, tl, 1.0, "batchmean")
        for loss in (by_shape(h, w, b, tl), by_argument(h, w, b, tl, rows // 2 + 1)):
            _close(loss, want_loss, torch.float32, "loss")
            got = torch.autograd.grad(loss, (h, w, b))
            for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
                _close(x, y, torch.float32, what)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_default_chunk_keeps_a_dynamic_row_count_dynamic(monkeypatch, backend):
    """Without ``chunk_rows``, the default chunk is the budget's whatever the symbolic row count:
    comparing the two guarded the graph on it, and ``torch.export`` with a dynamic batch
    raised a constraint violation. The exported program and a dynamic compile give the
    oracle's loss for a count under the chunk and one split into several chunks."""
    _use_backend(monkeypatch, backend)
    per_row = 11 * (2 * 4 + (chunks.CPU_SCRATCH_BYTES if DEVICE.type != "cuda" else 0))
    budget = "DEFAULT_CHUNK_BYTES" if DEVICE.type == "cuda" else "DEFAULT_CPU_CHUNK_BYTES"
    monkeypatch.setattr(chunks, budget, 64 * per_row)  # 64 rows a chunk (one row multiple)

    class Head(torch.nn.Module):
        def forward(self, h, w, b, t):
            return fused_linear_kd_loss(h, w, t, student_bias=b, temperature=2.0)

    h, w, b, _, _, _, tl, _ = _inputs((6,), 8, 11, torch.float32, seed=64)
    rows = torch.export.Dim("rows", min=2, max=1 << 20)
    shapes = ({0: rows}, None, None, {0: rows})
    program = torch.export.export(Head(), (h, w, b, tl), dynamic_shapes=shapes).module()
    torch._dynamo.reset()
    compiled = torch.compile(Head(), fullgraph=True, dynamic=True, backend="aot_eager")
    for n, seed in ((3, 65), (150, 66)):
        h, w, b, _, _, _, tl, _ = _inputs((n,), 8, 11, torch.float32, seed=seed)
        want, _ = _oracle(h, w, b, tl, 2.0, "batchmean")
        _close(program(h, w, b, tl), want, torch.float32, f"exported, {n} rows")
        _close(compiled(h, w, b, tl), want, torch.float32, f"compiled, {n} rows")
    torch._dynamo.reset()


def _use_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    if backend == "triton" and DEVICE.type == "cpu":
        if __import__("os").environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", backend)


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


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_zero_width_head(monkeypatch, backend, reduction):
    """A ``[V, 0]`` head (hidden size 0), as ``torch.nn.functional.linear`` takes one: the
    logits are the bias, and the hidden and weight gradients are empty tensors of their own
    shapes (the accumulator's in-place rounding keeps the shape of an empty one)."""
    _use_backend(monkeypatch, backend)
    h, w, b, _, _, _, tl, mask = _inputs((2, 3), 0, 11, torch.float32, seed=67)
    loss = fused_linear_kd_loss(
        h, w, tl, student_bias=b, temperature=2.0, reduction=reduction, mask=mask, chunk_rows=4
    )
    go = torch.rand(loss.shape, generator=_gen(68)) + 0.5
    got = torch.autograd.grad(loss, (h, w, b), go)
    want_loss, want = _oracle(h, w, b, tl, 2.0, reduction, mask, grad_output=go)
    _close(loss, want_loss, torch.float32, "loss")
    assert got[0].shape == (2, 3, 0) and got[1].shape == (11, 0)
    for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
        _close(x, y, torch.float32, what)


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


# --------------------------------------------------------------------------- custom op, compile


def test_custom_ops_pass_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom ops. With a
    scalar reduction the forward op's gradient buffers are spent in place by the backward
    (``kasmina::fused_linear_kd_spend_``), so they may not be returned from a compiled graph,
    which opcheck's AOT test does with every output; the public function returns the loss
    alone, and the compile tests below run that path."""
    h, w, b, th, tw, _, _, mask = _inputs((2, 5), 8, 33, torch.float32, seed=15)
    every = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_static", "test_aot_dispatch_dynamic")  # fmt: skip
    for reduction in ("batchmean", "none"):
        args = (h, w, b, None, th, tw, None, mask, 2.0, reduction, 4, 0.5, None, 5.0, None,
                True, True, True)  # fmt: skip
        checks = every if reduction == "none" else every[:3]
        torch.library.opcheck(torch.ops.kasmina.fused_linear_kd_loss, args, test_utils=checks)
    with torch.no_grad():
        outputs = torch.ops.kasmina.fused_linear_kd_loss(*args[:9], "sum", *args[10:])
    grad_h, acc_w, acc_b, scale, _, spent = outputs[1:]
    spend = (torch.tensor(0.5), grad_h, acc_w, acc_b, scale, spent, h.detach(), w.detach(),
             b.detach(), None, th, tw, None, mask, 2.0, "sum", 4, 0.5, None, 5.0, None, True,
             True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.kasmina.fused_linear_kd_spend_, spend)
    stats = torch.rand(10, 4, generator=_gen(16)) + 1.0
    grad_output = torch.rand(2, 5, generator=_gen(17))
    args = (h.detach(), w.detach(), b.detach(), None, th, tw, None, mask, stats, grad_output,
            2.0, 4, 0.5, None, 5.0, None, True, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.kasmina.fused_linear_kd_loss_backward, args)


def test_compiles_fullgraph_and_matches_eager():
    """One small case (Inductor on a CPU is slow): loss and gradients under
    ``torch.compile(fullgraph=True)`` equal the eager path's."""
    torch._dynamo.reset()
    h, w, b, th, tw, tb, _, mask = _inputs((2, 5), 8, 33, torch.float32, seed=18)

    def step(h, w, b):
        return fused_linear_kd_loss(
            h * 1.0, w, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, student_bias=b,
            temperature=2.0, mask=mask, chunk_rows=4, student_softcap=5.0,
        )  # fmt: skip

    compiled = torch.compile(step, fullgraph=True)(h, w, b)
    got = torch.autograd.grad(compiled, (h, w, b))
    eager = step(h, w, b)
    want = torch.autograd.grad(eager, (h, w, b))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_compiled_backward_spends_the_accumulators_in_place_and_can_run_twice():
    """Under ``torch.compile`` too the weight and bias gradients are rounded in the fp32
    accumulators' own storage (bf16 gradients in fp32-sized storages: no second weight-sized
    buffer), equal to the eager path's; a second backward through the retained graph
    recomputes the spent buffers and gives the same gradients again."""
    torch._dynamo.reset()
    h, w, b, th, tw, _, _, _ = _inputs((2, 5), 8, 33, torch.bfloat16, seed=41)

    def step(h, w, b):
        return fused_linear_kd_loss(h * 1.0, w, teacher_hidden=th, teacher_weight=tw,
                                    student_bias=b, temperature=2.0, chunk_rows=4)  # fmt: skip

    loss = torch.compile(step, fullgraph=True)(h, w, b)
    first = torch.autograd.grad(loss, (h, w, b), retain_graph=True)
    again = torch.autograd.grad(loss * 0.5, (h, w, b))
    want = torch.autograd.grad(step(h, w, b), (h, w, b))
    for got, twice, ref in zip(first, again, want, strict=True):
        assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref)
        assert torch.equal(twice, ref * 0.5)
    assert first[1].untyped_storage().nbytes() == w.numel() * 4  # the accumulator's storage
    assert first[2].untyped_storage().nbytes() == b.numel() * 4
    torch._dynamo.reset()


# --------------------------------------------------------------------------- memory


class _Allocations(TorchDispatchMode):
    """Records the largest storage any op creates (views of existing storages excluded) and the
    peak of the bytes held at once by the storages created under it (``peak``: each storage
    counted until it is freed, whoever holds it; the pre-existing inputs are not counted)."""

    def __init__(self, existing: list[Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in existing if t is not None}
        self.largest = 0
        self.peak = 0
        self.opaque = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def track(self, out: object) -> None:
        """Count the new storages among ``out``'s tensors, then the bytes alive now."""
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.known:
                continue
            self.largest = max(self.largest, storage.nbytes())
            held = self._live.get(ptr)
            if held is None or held[0].expired():
                self._live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self._live.values()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.opaque:
            self.track(out)
        return out


def _opaque_kd_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under an ``_Allocations`` probe, count the KD op like the GPU kernels it stands for:
    only what it returns (the CPU path's fp32 temporaries are a CPU matter, and would swell
    eager's side most)."""
    import kasmina.ops.kd_loss as kd

    def opaque(fn):
        def run(*args, **kwargs):
            probe = _get_current_dispatch_mode()
            if not isinstance(probe, _Allocations):
                return fn(*args, **kwargs)
            probe.opaque += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                probe.opaque -= 1
            probe.track(out)
            return out

        return run

    for module in (chunks, kd):
        for name in ("kd_forward_impl", "kd_backward_impl"):
            monkeypatch.setattr(module, name, opaque(getattr(module, name)))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocation probe")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("teacher", ["head", "logits"])
def test_no_rows_by_vocab_tensor_is_ever_allocated(reduction, teacher):
    """Every storage created in forward + backward, and every tensor saved for the backward,
    is at most the largest of one chunk's fp32 logits, the weight's fp32 accumulator and the
    hidden gradient, all far below one ``[rows, V]`` fp32 tensor. The same probe catches the
    eager ``kd_kl_loss(h @ W.T)``, so it can fail."""
    rows, hidden, vocab, chunk = 96, 8, 200, 8
    h, w, b, th, tw, tb, tl, mask = _inputs((rows,), hidden, vocab, torch.float32, seed=19)
    bound = 4 * max(chunk * vocab, vocab * hidden, rows * hidden)
    assert rows * vocab * 4 >= 10 * bound
    kwargs = dict(student_bias=b, temperature=2.0, reduction=reduction, mask=mask,
                  chunk_rows=chunk, student_softcap=4.0)  # fmt: skip
    if teacher == "head":
        kwargs.update(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, teacher_softcap=4.0)
    probe = _Allocations([h, w, b, th, tw, tb, tl, mask])
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:  # tensors saved for the backward, inputs excepted
        if t.untyped_storage().data_ptr() not in probe.known:
            saved.append(t.untyped_storage().nbytes())
        return t

    with probe, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_linear_kd_loss(h, w, None if teacher == "head" else tl, **kwargs)
        grads = torch.autograd.grad(loss.sum(), (h, w, b))
    assert all(g is not None for g in grads)
    assert 0 < probe.largest <= bound, (probe.largest, bound)
    assert saved and max(saved) <= bound

    eager_probe = _Allocations([h, w, b, tl, mask])
    with eager_probe:
        loss = kd_kl_loss(h @ w.t() + b, tl, 2.0, reduction, mask)
        torch.autograd.grad(loss.sum(), (h, w, b))
    assert eager_probe.largest >= rows * vocab * 4


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU allocation probe")
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_peak_memory_is_at_most_an_eighth_of_eager_with_the_head_trained(
    monkeypatch: pytest.MonkeyPatch, reduction: str
):
    """docs/design.md §2/§8: peak extra memory <= 1/8 of eager's at 8×4096 rows × H 4096 ×
    V 128,256 in bf16 with the head trained and a teacher head, here with every dimension and
    the default CUDA chunk divided by 64 (the ratios of all the terms are those of the real
    shape). Peak live bytes of everything created in forward + backward, gradients included;
    the KD op counts only its outputs, as its GPU kernels allocate nothing else. Eager holds
    the student's and teacher's logits, the logits gradient and the head's gradients (24.7
    GiB at the real shape); the fused op peaks at 2.7 GiB there. Rounding the fp32 weight
    accumulator into a second buffer (the old way, 3.4 GiB) or a doubled default chunk fails
    this."""
    shrink = 64
    rows, hidden, vocab = 8 * 4096 // shrink, 4096 // shrink, 128_256 // shrink
    bf16 = torch.bfloat16
    chunk = chunks.default_chunk_rows(8 * 4096, 128_256, bf16, bf16) // shrink
    h, w, _, th, tw, _, _, _ = _inputs((rows,), hidden, vocab, bf16, seed=30, bias=False,
                                       t_hidden=hidden)  # fmt: skip
    _opaque_kd_op(monkeypatch)
    probe = _Allocations([h, w, th, tw])
    with probe:
        loss = fused_linear_kd_loss(h, w, teacher_hidden=th, teacher_weight=tw, temperature=2.0,
                                    reduction=reduction, chunk_rows=chunk)  # fmt: skip
        grads = torch.autograd.grad(loss.sum(), (h, w))
    fused = probe.peak

    eager_probe = _Allocations([h, w, th, tw])
    with eager_probe:
        student = h @ w.t()
        with torch.no_grad():
            teacher = th @ tw.t()
        loss = kd_kl_loss(student, teacher, 2.0, reduction)
        want = torch.autograd.grad(loss.sum(), (h, w))
    eager = eager_probe.peak
    logits = rows * vocab * 2
    assert eager >= 3 * logits + vocab * hidden * 2, (eager, logits)
    assert fused * 8 <= eager, (fused, eager, fused / eager)
    for got, ref in zip(grads, want, strict=True):
        _close(got, ref, bf16, "fused vs eager gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_in_place_equals_rounding_into_a_fresh_tensor(dtype):
    """The in-place rounding of an fp32 accumulator (blocks that double from the first,
    temporary one) gives bitwise what rounding into a new tensor gives, in the accumulator's
    own storage, for sizes that end mid-block."""
    n_rows = (chunks.FIRST_ROUND_BLOCK * 11 + 5) // 7
    acc = torch.randn(n_rows, 7, generator=_gen(31)) * 1e3
    for scale in (None, torch.tensor(3.0e-4)):
        want = (acc if scale is None else acc * scale).to(dtype)  # rounded into a new tensor
        spent = acc.clone()
        got = chunks._round_in_place(spent, dtype, scale)
        assert got.untyped_storage().data_ptr() == spent.untyped_storage().data_ptr()
        assert got.dtype == dtype and got.shape == acc.shape and got.is_contiguous()
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 1e20}, "temperature must be within"),
        ({"temperature": 1e-40}, "temperature must be within"),
        ({"student_softcap": -1.0}, "student_softcap"),
        ({"teacher_logit_scale": float("nan")}, "teacher_logit_scale"),
        # Finite and > 0, but inf (or, for a cap, 0) in float32: NaN logits or gradients, or an
        # overflow raised from inside addmm.
        ({"student_softcap": 3.5e38}, r"student_softcap must be in \["),
        ({"student_softcap": 1e-50}, r"student_softcap must be in \["),
        ({"student_logit_scale": 1e300}, r"student_logit_scale must be in \["),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": 2.5}, "chunk_rows"),
        ({"chunk_rows": True}, "chunk_rows"),
        ({"teacher_logits": None}, "either"),
        ({"teacher_hidden": "t_hidden"}, "either"),
        ({"teacher_logits": "bad_vocab"}, "teacher_logits shape"),
        ({"student_weight": "bad_hidden"}, "student_weight"),
        ({"student_weight": "half"}, "dtype"),
        ({"student_bias": "bad_bias"}, "student_bias"),
        ({"mask": "float_mask"}, "bool"),
        ({"mask": "bad_mask"}, "mask shape"),
        ({"student_hidden": "double"}, "float32"),
    ],
)
def test_rejections(change, match):
    g = _gen(20)
    samples = {
        "t_hidden": torch.randn(2, 3, 4, generator=g),
        "bad_vocab": torch.randn(2, 3, 9, generator=g),
        "bad_hidden": torch.randn(10, 6, generator=g),
        "half": torch.randn(10, 5, generator=g).half(),
        "bad_bias": torch.randn(9, generator=g),
        "float_mask": torch.ones(2, 3),
        "bad_mask": torch.ones(6, dtype=torch.bool),
        "double": torch.randn(2, 3, 5, dtype=torch.float64),
    }
    args = {
        "student_hidden": torch.randn(2, 3, 5, generator=g),
        "student_weight": torch.randn(10, 5, generator=g),
        "teacher_logits": torch.randn(2, 3, 10, generator=g),
    }
    for key, value in change.items():
        args[key] = samples.get(value, value) if isinstance(value, str) else value
    if "teacher_hidden" in args:
        args["teacher_weight"] = torch.randn(10, 4, generator=g)
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(
            args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_logits"),
            **args,
        )  # fmt: skip


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


# --------------------------------------------------------------------------- benchmark code


@pytest.mark.slow  # a subprocess that interprets the kernels: about 30 s on two shared cores
def test_gpu_bench_fused_linear_rows_run_in_smoke_mode(tmp_path):
    """``perf/bench_gpu.py --smoke --ops fused_linear_kd``: the fused-linear rows of the GPU
    table at tiny sizes on the CPU build, check against float64 and write their JSON."""
    rows = gpu_bench_smoke_rows("fused_linear_kd", tmp_path)
    assert {r["impl"] for r in rows} == {"kasmina", "kasmina default chunk", "eager"}


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
