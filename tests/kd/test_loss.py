"""``kd.loss`` refusals of teacher logits a seed's KD cannot read (a clear ``ValueError``), and the
hand-over of logits to a slot's device."""

from __future__ import annotations

import pytest
import torch

from kasmina.kd import loss as kd_loss_module
from kasmina.kd.config import KDConfig
from kasmina.kd.loss import StaticKDLoss, checked_teacher_logits, seed_kd_loss
from kasmina.ops.kd_loss import kd_kl_loss


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


@pytest.mark.parametrize("head", [False, True])
def test_static_kd_loss_reads_teacher_logits_as_the_seeds_kd_does(head: bool) -> None:
    """``StaticKDLoss`` masks a teacher row holding a NaN or ``+inf`` and reads float64 teacher
    logits in fp32, as ``seed_kd_loss`` does: it gave NaN for the whole batch, and refused the
    float64 logits, where a seed's KD over the same tensors gave the loss of the good rows."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 6)
    hidden = torch.randn(5, 4)
    teacher = torch.randn(5, 6, dtype=torch.float64)
    teacher[1, 2], teacher[3, 0] = float("nan"), float("inf")
    extra = {"student_weight": linear.weight, "student_bias": linear.bias} if head else {}
    student = hidden if head else linear(hidden)
    got = StaticKDLoss(2.0)(student, teacher, **extra)
    config = KDConfig(temperature=2.0)
    want = seed_kd_loss(
        config,
        student,
        teacher,
        head_weight=linear.weight if head else None,
        head_bias=linear.bias if head else None,
    )
    keep = torch.tensor([True, False, True, False, True])
    good = StaticKDLoss(2.0)(student[keep], teacher[keep].float(), **extra)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, good)
    got.backward()
    assert torch.isfinite(linear.weight.grad).all()


def test_static_kd_loss_keeps_its_own_mask_beside_the_bad_rows() -> None:
    """A caller's mask and the teacher's bad rows both drop rows; a mask of another shape is
    refused rather than broadcast over the rows."""
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    teacher[0, 1] = float("nan")
    mask = torch.tensor([True, True, False, True])
    loss = StaticKDLoss(reduction="none")(student, teacher, mask)
    assert loss[0] == 0 and loss[2] == 0 and (loss[[1, 3]] > 0).all()
    with pytest.raises(ValueError, match="leading dims"):
        StaticKDLoss()(student, teacher, torch.tensor([True]))
    with pytest.raises(ValueError, match="bool tensor"):
        StaticKDLoss()(student, teacher, torch.ones(4))


def test_static_kd_loss_of_float64_logits_is_the_float64_reference() -> None:
    """float64 student and teacher (a gradient check) take the float64 reference, as a seed's
    KD does: ``StaticKDLoss`` refused them."""
    torch.manual_seed(0)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64)
    kd = StaticKDLoss(1.5)
    assert torch.autograd.gradcheck(lambda s: kd(s, teacher), (student,))


def _masks_handed_on(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor | None]:
    """The ``mask`` each ``kd_kl_loss`` call from ``kd.loss`` gets, recorded."""
    seen: list[torch.Tensor | None] = []

    def spy(student, teacher, temperature, reduction, mask):  # type: ignore[no-untyped-def]
        seen.append(mask)
        return kd_kl_loss(student, teacher, temperature, reduction, mask)

    monkeypatch.setattr(kd_loss_module, "kd_kl_loss", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_cpu_batch_with_no_bad_teacher_row_takes_the_unmasked_kd_loss(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    """On eager CPU tensors a batch with no bad teacher row and no caller's mask reaches
    ``kd_kl_loss`` with no mask (the masked CPU path costs two logits-sized passes more): an
    all-true mask was formed for every batch, ``StaticKDLoss`` and a seed's KD alike. An fp16
    teacher whose sum passes fp16's range is still found fine (by the fp32 sum, or else by its
    rows' maxima: either way no mask); a bad row or a caller's mask is still masked."""
    seen = _masks_handed_on(monkeypatch)
    torch.manual_seed(0)
    student = torch.randn(4, 300, requires_grad=True)
    teacher = (torch.randn(4, 300) + 300.0).to(dtype)  # sums to ~360000: past fp16's 65504
    kd = StaticKDLoss(2.0)
    kd(student, teacher).backward()
    seed_kd_loss(KDConfig(temperature=2.0), student, teacher)
    assert seen == [None, None]
    seen.clear()
    bad = teacher.clone()
    bad[2, 5] = float("nan")
    kd(student, bad)
    kd(student, teacher, torch.ones(4, dtype=torch.bool))
    assert [m.tolist() for m in seen] == [[True, True, False, True], [True] * 4]


def test_compiled_static_kd_loss_keeps_the_teacher_row_mask_in_one_graph() -> None:
    """Compiled whole (``fullgraph=True``) the loss reads no logits on the host to choose its
    mask (a branch on data would break the graph): a bad teacher row is masked there too."""
    torch.manual_seed(0)
    student = torch.randn(3, 8, requires_grad=True)
    teacher = torch.randn(3, 8)
    teacher[1, 0] = float("inf")
    kd = StaticKDLoss(2.0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda s, t: kd(s, t), backend="eager", fullgraph=True)
    got = compiled(student, teacher)
    got.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    torch.testing.assert_close(got, kd(student, teacher))
    torch.testing.assert_close(got, kd(student[[0, 2]], teacher[[0, 2]]))
