"""Knowledge distillation: a frozen teacher, and the KD losses that train seeds from it.

A teacher (``CheckpointedTeacher``) is a copy of a model held in eval mode, optionally in
bf16/fp16, with frozen parameters held as teacher-only while it is open
(``is_teacher_parameter``, ``kd/holds.py``: the optimizer manager refuses them, and a second
teacher in place of the model or of its memory is refused). Its forward runs under
``torch.inference_mode``: no autograd graph is kept, which is what halves its memory together
with the reduced dtype (activation checkpointing would save nothing without a backward).
``TeacherForwardPassManager`` times each teacher forward and survives an out-of-memory error: KD
is skipped for that step, the allocator cache is freed and training goes on.

The loss is always the fused ``kasmina.ops.kd_kl_loss`` (``T² · KL(teacher ‖ student)`` per row,
docs/design.md §2, §7). ``seed_kd_loss`` is the one helper seeds and slots use to distil a seed's
output against detached teacher logits, and ``sum_kd_losses`` sums what they collected;
``StaticKDLoss`` is the ``nn.Module`` form for trainers. ``KDConfig`` is validated once, here.

Imports only ``kasmina.ops`` (and torch); seeds, the manager and the demo build on it.
"""

from kasmina.kd.config import KDConfig
from kasmina.kd.graph import sum_kd_losses
from kasmina.kd.holds import is_teacher_parameter
from kasmina.kd.loss import StaticKDLoss, seed_kd_loss
from kasmina.kd.teacher import (
    CheckpointedTeacher,
    TeacherForwardPassManager,
    is_oom_error,
)

__all__ = [
    "CheckpointedTeacher",
    "KDConfig",
    "StaticKDLoss",
    "TeacherForwardPassManager",
    "is_oom_error",
    "is_teacher_parameter",
    "seed_kd_loss",
    "sum_kd_losses",
]
