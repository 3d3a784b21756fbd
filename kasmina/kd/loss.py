"""The KD losses over the fused ``kd_kl_loss``: a module for trainers, and the one helper
that seeds and slots use to distil a seed's output (and to sum what they collected)."""

from __future__ import annotations

import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.ops import kd_kl_loss

__all__ = ["StaticKDLoss", "seed_kd_loss", "sum_kd_losses"]


class StaticKDLoss(nn.Module):
    """KD loss at a fixed temperature: ``T²·KL(softmax(t/T) ‖ softmax(s/T))`` via ``kd_kl_loss``.

    The teacher logits are detached (the teacher never gets a gradient); the student's gradient
    is kept, so the loss trains whatever produced ``student_logits``.
    """

    def __init__(self, temperature: float = 1.0, reduction: str = "batchmean") -> None:
        super().__init__()
        checked = KDConfig(temperature=temperature, reduction=reduction)  # the one validation
        self.temperature = float(checked.temperature)
        self.reduction = checked.reduction

    @classmethod
    def from_config(cls, config: KDConfig) -> StaticKDLoss:
        return cls(temperature=config.temperature, reduction=config.reduction)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_kl_loss(
            student_logits,
            teacher_logits.detach(),
            temperature=self.temperature,
            reduction=self.reduction,
            mask=mask,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


def seed_kd_loss(config: KDConfig, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``kd_kl_loss`` of a seed-path student against detached teacher logits."""
    if teacher.shape != student.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} != student {tuple(student.shape)}")
    return kd_kl_loss(student, teacher.detach(), config.temperature, config.reduction)


def sum_kd_losses(losses: list[torch.Tensor]) -> torch.Tensor | None:
    if not losses:
        return None
    total = torch.stack([loss if loss.dim() == 0 else loss.sum() for loss in losses]).sum()
    losses.clear()
    return total
