"""The teacher holds (kd.holds): a dropped teacher's model is taken again, and every change of the
holds is seen by the optimizers' kept copy of them."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

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
