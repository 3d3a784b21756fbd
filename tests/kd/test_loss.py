"""``kd.loss`` refusals of teacher logits a seed's KD cannot read (a clear ``ValueError``), and the
hand-over of logits to a slot's device."""

from __future__ import annotations

import pytest
import torch

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import checked_teacher_logits, seed_kd_loss


@pytest.mark.parametrize("shape", [(2, 0), ()])
def test_seed_kd_loss_refuses_teacher_logits_without_a_vocabulary(shape: tuple[int, ...]) -> None:
    """Logits with an empty or no last dimension are refused by name, before the row check
    (a maximum over an empty dimension raised torch's own ``RuntimeError``)."""
    student = torch.zeros(shape, requires_grad=True)
    with pytest.raises(ValueError, match="teacher logits need a non-empty last dim"):
        seed_kd_loss(KDConfig(), student, torch.zeros(shape))


@pytest.mark.parametrize("made_in_inference_mode", [False, True])
def test_logits_moved_to_a_slots_device_inside_inference_mode_are_ordinary_tensors(
    made_in_inference_mode: bool,
) -> None:
    """A hand-over inside ``torch.inference_mode()`` (where a teacher's logits are naturally
    made) of logits on another device than the slot's: the copy was an inference tensor,
    which autograd refuses to save and a compiled model cannot copy out. Same-device logits
    were already copied out; moved ones now are too. (The meta device stands in for a second
    device: a CPU-only test.)"""
    teacher = torch.randn(2, 3)
    with torch.inference_mode():
        if made_in_inference_mode:
            teacher = torch.randn(2, 3)
        moved = checked_teacher_logits(teacher, torch.device("meta"))
        kept = checked_teacher_logits(teacher, torch.device("cpu"))
    assert moved is not None and moved.device.type == "meta" and not moved.is_inference()
    assert kept is not None and not kept.is_inference()
