"""``kd.loss`` refusals of teacher logits a seed's KD cannot read: a clear ``ValueError``."""

from __future__ import annotations

import pytest
import torch

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import seed_kd_loss


@pytest.mark.parametrize("shape", [(2, 0), ()])
def test_seed_kd_loss_refuses_teacher_logits_without_a_vocabulary(shape: tuple[int, ...]) -> None:
    """Logits with an empty or no last dimension are refused by name, before the row check
    (a maximum over an empty dimension raised torch's own ``RuntimeError``)."""
    student = torch.zeros(shape, requires_grad=True)
    with pytest.raises(ValueError, match="teacher logits need a non-empty last dim"):
        seed_kd_loss(KDConfig(), student, torch.zeros(shape))
