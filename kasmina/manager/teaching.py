"""The manager's side of knowledge distillation (docs/design.md §7): the teacher it holds, and
what it hands its slots for their seeds' KD loss.

``new_teacher`` builds the teacher ``load_teacher`` holds; ``hand_teacher_logits`` gives the
next forward's teacher logits to the slots that read logits that wide (``set_teacher_logits``),
and ``hand_kd_head`` a language model's head to the slots it fits (``set_kd_head``). Each is
given the ``ManagerState`` (its configuration, slots and counters), never the manager, whose
methods are the doors and hold its lock where one is needed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kasmina.kd.loss import checked_teacher_logits
from kasmina.kd.teacher import CheckpointedTeacher
from kasmina.manager.state import ManagerState

logger = logging.getLogger(__name__)

__all__ = ["hand_kd_head", "hand_teacher_logits", "new_teacher"]


def new_teacher(
    state: ManagerState, model: nn.Module, device: torch.device | str | None, copy_model: bool
) -> CheckpointedTeacher:
    """``model`` as the frozen reduced-precision teacher (``config.teacher_dtype``) on ``device``
    (None: the host's, else the manager's), in place of the one held (``replaces``) but not yet
    held; a closed manager's state takes none (``RuntimeError``, before ``model`` is frozen or
    cast); the teacher checks, in place, a model it cannot take (``holds.check_in_place``)."""
    state.require_open()  # close() closed its last one: one taken after stayed held
    if device is None:
        host = next(iter(state.registry.host_params), None) if state.registry else None
        device = host.device if host is not None else state.device
    return CheckpointedTeacher(
        model, dtype=state.config.teacher_torch_dtype, device=device, copy_model=copy_model,
        checkpoint_path=state.config.teacher_checkpoint_path, replaces=state.teacher,
    )  # fmt: skip


def hand_teacher_logits(state: ManagerState, teacher_logits: torch.Tensor | None) -> list[str]:
    """``manager.set_teacher_logits``: the logits handed to the next forward of the slots that
    read KD logits that wide on their last dim, on each one's device; their ids."""
    if (teacher_logits := checked_teacher_logits(teacher_logits)) is None:  # ValueError
        for slot in state.kd_slots(None):  # closed: RuntimeError, no slot cleared
            slot.set_teacher_logits(None)
        return []
    width = teacher_logits.shape[-1]
    chosen = state.kd_slots(width)  # closed: RuntimeError, before any slot is armed
    # Checked, moved or copied once a device, before any slot takes them: a refusal sets none.
    devices = {s.sat_out_compiled.device for s in chosen}
    on = {d: checked_teacher_logits(teacher_logits, d) for d in devices}
    uncollected = sum(s.set_teacher_logits(on[s.sat_out_compiled.device]) for s in chosen)
    state.counters["kd_uncollected"] += uncollected  # a skipped batch's? (logged by slot)
    if not chosen and not state.counters["teacher_logits_unread"]:
        logger.warning("no slot reads %d-wide teacher logits on its last dim: no KD", width)
    state.counters["teacher_logits_unread"] += not chosen
    return [s.layer_id for s in chosen]


def hand_kd_head(state: ManagerState, weight: torch.Tensor, bias: torch.Tensor | None) -> list[str]:
    """``manager.set_kd_head``: the head given to every slot it fits; their ids."""
    chosen = state.kd_head_slots(weight, bias)  # closed: RuntimeError; all checked
    for slot in chosen:
        slot.set_kd_head(weight, bias)
    return [slot.layer_id for slot in chosen]
