"""kd_kl_loss's input rejection: the op's (reduction, temperature, dtypes, shapes, devices,
masks; the reference refuses the same reductions and temperatures) and the launchers' own
(``grad_output`` and statistics shapes, reduction)."""

from __future__ import annotations

import kasmina.kernels.kd_loss as kernels
import pytest
import torch

from kasmina.ops import kd_kl_loss, kd_kl_loss_reference
from tests.ops.kd_helpers import DEVICE, KERNEL_WARNINGS
from tests.ops.kd_loss_helpers import _logits

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


def test_launcher_rejections():
    student, teacher = _logits((3, 8), seed=5)
    loss, stats, scale = kernels.kd_forward(student, teacher, None, 1.0, "none", True)
    with pytest.raises(ValueError, match="grad_output"):
        kernels.kd_backward(student, teacher, None, stats, scale, torch.ones(4), 1.0, "none")
    with pytest.raises(ValueError, match="grad_output"):
        kernels.kd_backward(student, teacher, None, stats, scale, torch.ones(3), 1.0, "sum")
    with pytest.raises(ValueError, match="stats"):
        kernels.kd_backward(student, teacher, None, stats[:2], scale, torch.ones(()), 1.0, "sum")
    with pytest.raises(ValueError, match="reduction"):
        kernels.kd_forward(student, teacher, None, 1.0, "avg", True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reduction": "avg"}, "reduction"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": torch.tensor(1.0)}, "temperature"),
        ({"temperature": 1e20}, "temperature must be within"),  # T² overflowed fp32: inf, NaN
        ({"temperature": 1e-40}, "temperature must be within"),  # log2(e)/T overflowed fp32
        ({"temperature": 1e-22}, "temperature must be within"),  # T² was 0 in fp32: loss 0
        ({"student": torch.zeros(2, 5, dtype=torch.float64)}, "float32"),
        ({"teacher": torch.zeros(2, 5, dtype=torch.int64)}, "float32"),
        ({"teacher": torch.zeros(2, 6)}, "same shape"),
        ({"teacher": torch.zeros(2, 5, device="meta")}, "meta"),
        ({"student": torch.zeros(2, 0), "teacher": torch.zeros(2, 0)}, "non-empty"),
        ({"student": torch.zeros(()), "teacher": torch.zeros(())}, "non-empty"),
        ({"mask": torch.ones(2)}, "bool"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, "leading dims"),
        ({"mask": torch.ones(2, dtype=torch.bool, device="meta")}, "meta"),
    ],
)
def test_rejections(kwargs, match):
    # The cases are built at import, on the CPU: each moves to DEVICE (meta stays meta), so a
    # GPU run tests the same rejection and not a device mismatch.
    kwargs = {
        k: v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
        for k, v in kwargs.items()
    }
    zeros = torch.zeros(2, 5, device=DEVICE)
    args = {"student": zeros, "teacher": zeros, **kwargs}
    if "reduction" in kwargs or "temperature" in kwargs:  # the oracle refuses them too
        with pytest.raises(ValueError, match=match):
            kd_kl_loss_reference(torch.zeros(2, 5), torch.zeros(2, 5), **kwargs)
    with pytest.raises(ValueError, match=match):
        kd_kl_loss(
            args.pop("student"),
            args.pop("teacher"),
            temperature=args.pop("temperature", 1.0),
            reduction=args.pop("reduction", "batchmean"),
            mask=args.pop("mask", None),
        )
