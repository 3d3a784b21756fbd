"""The float64 oracle, input makers and backend switch of the ``fused_linear_kd_loss`` tests
(test_fused_linear_kd_*.py): the oracle is written out in plain torch (matmul, log-softmax KL,
autograd), no kasmina code."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kasmina.ops import fused_linear_kd_loss
from tests.ops.kd_helpers import DEVICE, _gen
from tests.ops.tolerances import tol


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


def _use_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    if backend == "triton" and DEVICE.type == "cpu":
        if __import__("os").environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", backend)
