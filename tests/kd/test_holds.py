"""The teacher holds (kd.holds): a dropped teacher's model is taken again, and every change of the
holds is seen by the optimizers' kept copy of them."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import kasmina.kd.teacher as teacher_module
from kasmina.errors import ParameterOverlapError
from kasmina.isolation.ownership import ParameterOwnership
from kasmina.kd.holds import is_teacher_parameter
from kasmina.kd.teacher import CheckpointedTeacher


def test_a_teacher_dropped_unclosed_in_a_reference_cycle_lets_the_next_take_its_model() -> None:
    """A teacher dropped without close() lets go only when collected; one in a reference cycle
    is not freed by its count, so a second in-place teacher of the model is asked again after a
    collection instead of being refused for a teacher nobody holds."""
    model = nn.Linear(4, 4)
    gc.collect()
    gc.disable()  # only the hold's own collection may free the first teacher
    try:
        first = CheckpointedTeacher(model, dtype=None, copy_model=False)
        first.cycle = first  # type: ignore[attr-defined]
        del first
        second = CheckpointedTeacher(model, dtype=None, copy_model=False)
    finally:
        gc.enable()
    assert second.teacher is model
    assert all(is_teacher_parameter(p) for p in model.parameters())


def test_a_hold_taken_after_an_optimizer_check_is_seen_by_its_next_check() -> None:
    """The optimizers keep the byte ranges teachers hold until the holds change: a teacher
    taking a model in place after a check must change them, or a parameter over its bytes
    (``nn.Parameter(w.data)``) is taken by an optimizer and stepped under the teacher."""
    gc.collect()  # no earlier test's teacher lets go between the two checks
    ownership = ParameterOwnership()
    ownership.check_optimizable([nn.Parameter(torch.zeros(4))], "s0")  # the holds read now
    model = nn.Linear(4, 4)
    teacher = CheckpointedTeacher(model, dtype=None, copy_model=False)
    alias = nn.Parameter(model.weight.data)
    with pytest.raises(ParameterOverlapError, match="shares memory with a teacher's parameter"):
        ownership.check_optimizable([alias], "s1")
    teacher.close()
    ownership.check_optimizable([alias], "s1")  # let go: its memory is free again


def test_a_hold_undone_by_a_failed_build_is_seen_by_a_check_made_while_it_held(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A check that read the holds while a teacher built (another thread registering a seed)
    kept them; the build then failed and undid its hold, which must count as a change, or the
    kept copy refuses the model's bytes for a teacher that holds nothing (its frames, kept by
    the error, keep it alive)."""
    gc.collect()
    ownership = ParameterOwnership()
    model = nn.Linear(4, 4)

    def load_then_fail(*args: object, **kwargs: object) -> None:
        ownership.check_optimizable([nn.Parameter(torch.zeros(4))], "s0")  # reads the holds
        raise ValueError("teacher checkpoint does not fit")

    monkeypatch.setattr(teacher_module, "_load_checked", load_then_fail)
    with pytest.raises(ValueError, match="does not fit") as failed:
        CheckpointedTeacher(model, dtype=None, copy_model=False, checkpoint_path="unread.pt")
    assert not any(is_teacher_parameter(p) for p in model.parameters())
    ownership.check_optimizable([nn.Parameter(model.weight.data)], "s1")
    del failed
