"""fused_linear_kd_loss's input rejection: reductions, temperatures, caps and scales beyond
float32, chunk sizes, teachers, shapes, dtypes and masks, and a teacher head's options given
with teacher logits."""

from __future__ import annotations

import pytest
import torch

from kasmina.ops import fused_linear_kd_loss, fused_linear_kd_loss_reference
from tests.ops.fused_linear_kd_helpers import _inputs
from tests.ops.kd_helpers import KERNEL_WARNINGS, _gen

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


@pytest.mark.parametrize("option", ["teacher_logit_scale", "teacher_softcap"])
def test_teacher_head_options_with_teacher_logits_are_refused(option):
    """A teacher's scale and cap shape its head's logits: with ``teacher_logits`` they were
    silently ignored (the loss of the uncapped teacher), by the op, its oracle and
    ``StaticKDLoss`` alike."""
    from kasmina.kd.loss import StaticKDLoss

    h, w, _, _, _, _, tl, _ = _inputs((4,), 8, 30, torch.float32, seed=22)
    for call in (fused_linear_kd_loss, fused_linear_kd_loss_reference):
        with pytest.raises(ValueError, match="apply to a teacher head"):
            call(h, w, tl, **{option: 2.0})
    with pytest.raises(ValueError, match="apply to a teacher head"):
        StaticKDLoss(**{option: 2.0})(h, tl, student_weight=w)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 1e20}, "temperature must be within"),
        ({"temperature": 1e-40}, "temperature must be within"),
        ({"student_softcap": -1.0}, "student_softcap"),
        ({"teacher_logit_scale": float("nan")}, "teacher_logit_scale"),
        # Finite and > 0, but inf (or, for a cap, 0) in float32: NaN logits or gradients, or an
        # overflow raised from inside addmm.
        ({"student_softcap": 3.5e38}, r"student_softcap must be in \["),
        ({"student_softcap": 1e-50}, r"student_softcap must be in \["),
        ({"student_logit_scale": 1e300}, r"student_logit_scale must be in \["),
        ({"chunk_rows": 0}, "chunk_rows"),
        ({"chunk_rows": 2.5}, "chunk_rows"),
        ({"chunk_rows": True}, "chunk_rows"),
        ({"teacher_logits": None}, "either"),
        ({"teacher_hidden": "t_hidden"}, "either"),
        ({"teacher_logits": "bad_vocab"}, "teacher_logits shape"),
        ({"student_weight": "bad_hidden"}, "student_weight"),
        ({"student_weight": "half"}, "dtype"),
        ({"student_bias": "bad_bias"}, "student_bias"),
        ({"mask": "float_mask"}, "bool"),
        ({"mask": "bad_mask"}, "mask shape"),
        ({"student_hidden": "double"}, "float32"),
    ],
)
def test_rejections(change, match):
    g = _gen(20)
    samples = {
        "t_hidden": torch.randn(2, 3, 4, generator=g),
        "bad_vocab": torch.randn(2, 3, 9, generator=g),
        "bad_hidden": torch.randn(10, 6, generator=g),
        "half": torch.randn(10, 5, generator=g).half(),
        "bad_bias": torch.randn(9, generator=g),
        "float_mask": torch.ones(2, 3),
        "bad_mask": torch.ones(6, dtype=torch.bool),
        "double": torch.randn(2, 3, 5, dtype=torch.float64),
    }
    args = {
        "student_hidden": torch.randn(2, 3, 5, generator=g),
        "student_weight": torch.randn(10, 5, generator=g),
        "teacher_logits": torch.randn(2, 3, 10, generator=g),
    }
    for key, value in change.items():
        args[key] = samples.get(value, value) if isinstance(value, str) else value
    if "teacher_hidden" in args:
        args["teacher_weight"] = torch.randn(10, 4, generator=g)
    with pytest.raises(ValueError, match=match):
        fused_linear_kd_loss(
            args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_logits"),
            **args,
        )  # fmt: skip
