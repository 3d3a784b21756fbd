"""The KD teacher's refusals and bookkeeping (kd.teacher) beyond test_kd: the parameters a cast
replaced are let go, a bad dtype or checkpoint is named as such, a parameterless teacher's
figures have no ratio to divide by, and a float64 teacher is measured at its own dtype."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kasmina.kd.holds import is_teacher_parameter
from kasmina.kd.teacher import CheckpointedTeacher, TeacherForwardPassManager


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_the_parameters_a_teachers_cast_replaced_are_let_go() -> None:
    """A cast that makes new parameter objects (torch's
    ``set_overwrite_module_params_on_conversion``) leaves the old ones with the caller who kept
    them: no teacher reads them any more, so they must not stay teacher-only for good."""
    model = _mlp()
    before = list(model.parameters())
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        teacher = CheckpointedTeacher(model, dtype=torch.bfloat16, copy_model=False)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    after = teacher.teacher_parameters()
    assert not {id(p) for p in before} & {id(p) for p in after}
    assert all(map(is_teacher_parameter, after))
    assert not any(map(is_teacher_parameter, before))


def test_a_measurement_at_a_dtype_no_teacher_takes_is_refused_as_such() -> None:
    teacher = CheckpointedTeacher(_mlp(), dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype must be fp32, fp16 or bf16, got torch.float64"):
        teacher.measure_forward_peak_bytes(torch.randn(2, 4), torch.float64)


def test_a_checkpoint_that_holds_no_state_dict_is_refused_as_such(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        CheckpointedTeacher(_mlp(), dtype=torch.float32, checkpoint_path=path)


def test_a_parameterless_teachers_figures_have_no_ratio() -> None:
    """No parameter bytes (a teacher of buffers or functions only): the ratio is not measured
    (NaN), not a division by zero out of ``get_checkpoint_effectiveness``."""
    forwards = TeacherForwardPassManager(
        CheckpointedTeacher(nn.Flatten(), dtype=None), profile_memory=False
    )
    assert forwards.get_teacher_predictions(torch.randn(2, 3)) is not None
    figures = forwards.get_checkpoint_effectiveness()
    assert figures["param_bytes_full"] == 0.0 and math.isnan(figures["param_memory_ratio"])


def test_a_float64_teacher_is_measured_at_its_own_dtype(caplog: pytest.LogCaptureFixture) -> None:
    """``dtype=None`` keeps a float64 model's dtype, and its forwards run: measuring it at that
    dtype (no ``dtype`` named) was refused as "dtype must be fp32, fp16 or bf16, got
    torch.float64", so the first forward's profile failed with a warning. Its own peak is now
    measured; its fp32 peak stays NaN (a cast to fp32 and back would round its weights), with
    no warning, and the teacher keeps its float64 weights."""
    teacher = CheckpointedTeacher(_mlp().double(), dtype=None)
    weights = [p.clone() for p in teacher.teacher_parameters()]
    batch = torch.randn(2, 4)
    own = teacher.measure_forward_peak_bytes(batch)
    assert own >= teacher.parameter_bytes() > 0
    forwards = TeacherForwardPassManager(teacher)
    with caplog.at_level(logging.WARNING, logger="kasmina.kd.teacher"):
        assert forwards.get_teacher_predictions(batch) is not None
    assert not caplog.records
    figures = forwards.get_checkpoint_effectiveness()
    assert figures["peak_forward_bytes_reduced"] == own
    assert math.isnan(figures["peak_forward_bytes_full"])
    for before, after in zip(weights, teacher.teacher_parameters(), strict=True):
        assert after.dtype == torch.float64 and torch.equal(before, after)


@pytest.mark.parametrize("budget", ["10", True, torch.tensor(10.0), 0, -1.0, math.nan, 10**400])
def test_a_forward_budget_that_is_no_positive_number_is_refused_by_name(budget: object) -> None:
    """A string raised a bare ``TypeError`` out of ``>``, and ``True`` was taken as a 1 ms
    budget, and an int past a float's range raised ``OverflowError``: each is a ``ValueError``
    naming ``budget_ms``, as 0 and NaN were."""
    with pytest.raises(ValueError, match="budget_ms must be"):
        TeacherForwardPassManager(None, budget_ms=budget)  # type: ignore[arg-type]


def test_an_infinite_forward_budget_never_counts_a_forward_slow() -> None:
    forwards = TeacherForwardPassManager(
        CheckpointedTeacher(_mlp(), dtype=None), budget_ms=math.inf, profile_memory=False
    )
    assert forwards.get_teacher_predictions(torch.randn(2, 4)) is not None
    assert forwards.slow_count == 0 and forwards.budget_ms == math.inf


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_logits_asked_for_inside_inference_mode_are_ordinary_tensors(
    dtype: torch.dtype | None,
) -> None:
    """The teacher's logits are ordinary tensors that any loss may save, also for a caller that
    asks inside its own ``torch.inference_mode()`` (where a teacher is naturally run): the
    copy out of the teacher's inference mode was made in the caller's, an inference tensor."""
    teacher = CheckpointedTeacher(_mlp(), dtype=dtype)
    with torch.inference_mode():
        logits = teacher(torch.randn(2, 4))
    assert not logits.is_inference() and logits.dtype == torch.float32


def test_a_measurement_at_another_dtype_keeps_the_teachers_parameters_held() -> None:
    """Under torch's ``set_overwrite_module_params_on_conversion`` the measurement's cast to
    fp32 (``module.to``) made new parameter objects, which the cast back kept: afterwards the
    teacher's parameters were held by no one, so an optimizer would take them. The cast now
    goes through ``.data`` both ways: the same objects, still teacher-only, in their dtype."""
    teacher = CheckpointedTeacher(_mlp(), dtype=torch.bfloat16)
    before = teacher.teacher_parameters()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        assert teacher.measure_forward_peak_bytes(torch.randn(2, 4), torch.float32) > 0
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    after = teacher.teacher_parameters()
    assert [id(p) for p in after] == [id(p) for p in before]
    assert all(map(is_teacher_parameter, after))
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in after)
    assert teacher.dtype == torch.bfloat16
