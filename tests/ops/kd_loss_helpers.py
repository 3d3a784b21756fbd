"""The float64 oracle and input makers of the ``kd_kl_loss`` tests (test_kd_loss_*.py).

Inputs are fresh random tensors (a seed per case, so a failure reproduces). On a machine with
CUDA every test runs on the GPU (the compiled kernels); on a CPU the Triton backend runs through
the interpreter."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.ops.kd_helpers import _gen
from tests.ops.tolerances import tol

NINF = float("-inf")


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
