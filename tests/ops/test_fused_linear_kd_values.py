"""fused_linear_kd_loss against an independent float64 oracle (plain matmul, log-softmax KL,
autograd) for the loss and the gradients of hidden states, weight and bias: every reduction,
masks, temperatures, fp32/bf16/fp16, teacher as logits and as a head, logit scale and soft-cap,
rows that are not a multiple of the chunk, odd vocabularies, non-contiguous inputs, a 1-D
hidden and a zero-width head; the CPU path and the Triton kernels (through the interpreter on
a CPU); equal to ``kd_kl_loss`` of the materialised logits; and the GPU benchmark's
fused-linear rows in smoke mode."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pytest
import torch

from kasmina.ops import fused_linear_kd_loss, kd_kl_loss
from tests.ops.bench_smoke import gpu_bench_smoke_rows
from tests.ops.fused_linear_kd_helpers import (
    _check_case,
    _close,
    _inputs,
    _oracle,
    _teacher_logits_of,
    _use_backend,
)
from tests.ops.kd_helpers import DEVICE, KERNEL_WARNINGS, REDUCTIONS, _gen

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


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


@pytest.mark.slow  # a subprocess that interprets the kernels: about 30 s on two shared cores
def test_gpu_bench_fused_linear_rows_run_in_smoke_mode(tmp_path):
    """``perf/bench_gpu.py --smoke --ops fused_linear_kd``: the fused-linear rows of the GPU
    table at tiny sizes on the CPU build, check against float64 and write their JSON."""
    rows = gpu_bench_smoke_rows("fused_linear_kd", tmp_path)
    assert {r["impl"] for r in rows} == {"kasmina", "kasmina default chunk", "eager"}
