"""The head path of the KD losses: ``StaticKDLoss`` and ``seed_kd_loss`` given hidden states and
a linear head (``fused_linear_kd_loss``) equal the same losses on the materialised logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import StaticKDLoss, seed_kd_loss
from kasmina.ops import kd_kl_loss

HIDDEN, T_HIDDEN, VOCAB = 8, 6, 37


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    head = nn.Linear(HIDDEN, VOCAB)
    teacher_head = nn.Linear(T_HIDDEN, VOCAB)
    hidden = torch.randn(3, 5, HIDDEN, requires_grad=True)
    teacher_hidden = torch.randn(3, 5, T_HIDDEN)
    mask = torch.rand(3, 5) > 0.3
    return head, teacher_head, hidden, teacher_hidden, mask


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_static_kd_loss_head_path_matches_logits_path(reduction: str) -> None:
    head, teacher_head, hidden, teacher_hidden, mask = _setup()
    kd = StaticKDLoss(temperature=2.0, reduction=reduction, chunk_rows=4)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    fused = kd(
        hidden, mask=mask, student_weight=head.weight, student_bias=head.bias,
        teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight,
        teacher_bias=teacher_head.bias,
    )  # fmt: skip
    given = kd(hidden, teacher_logits, mask, student_weight=head.weight, student_bias=head.bias)
    plain = kd(head(hidden), teacher_logits, mask)
    params = (hidden, head.weight, head.bias)
    go = torch.rand(plain.shape) + 0.5
    want = torch.autograd.grad(plain, params, go)
    for loss in (fused, given):
        torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
        for got, exp in zip(torch.autograd.grad(loss, params, go), want, strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-6)
    assert teacher_head.weight.grad is None


def test_static_kd_loss_head_options_and_rejections() -> None:
    head, teacher_head, hidden, teacher_hidden, _ = _setup(1)
    kd = StaticKDLoss(temperature=1.5, student_softcap=4.0, teacher_logit_scale=0.5)
    assert "student_softcap=4.0" in repr(kd) and "teacher_logit_scale=0.5" in repr(kd)
    loss = kd(hidden, student_weight=head.weight, teacher_hidden=teacher_hidden,
              teacher_weight=teacher_head.weight)  # fmt: skip
    logits = 4.0 * torch.tanh(hidden @ head.weight.t() / 4.0)
    teacher = (teacher_hidden @ teacher_head.weight.t()) * 0.5
    torch.testing.assert_close(loss, kd_kl_loss(logits, teacher, 1.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="student_weight"):
        StaticKDLoss()(hidden, teacher_hidden=teacher_hidden)
    with pytest.raises(ValueError, match="student_weight"):
        StaticKDLoss()(hidden, None)


def test_seed_kd_loss_with_a_head() -> None:
    head, teacher_head, hidden, teacher_hidden, _ = _setup(2)
    config = KDConfig(temperature=2.0)
    teacher = teacher_head(teacher_hidden).detach()
    fused = seed_kd_loss(config, hidden, teacher, head_weight=head.weight, head_bias=head.bias)
    plain = seed_kd_loss(config, head(hidden), teacher)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(fused, (hidden, head.weight, head.bias))
    want = torch.autograd.grad(plain, (hidden, head.weight, head.bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="head_weight"):
        seed_kd_loss(config, head(hidden), teacher, head_bias=head.bias)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        seed_kd_loss(config, hidden, teacher[..., :-1], head_weight=head.weight)
