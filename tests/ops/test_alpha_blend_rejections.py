"""alpha_blend's input rejection (mode, dtypes, shapes, devices, alpha's shape, type and
fp32 range; the reference refuses an unknown mode too) and the launchers' (non-contiguous
inputs)."""

from __future__ import annotations

import kasmina.kernels.alpha_blend as kernels
import pytest
import torch

from kasmina.ops import alpha_blend, alpha_blend_reference


def test_launchers_reject_non_contiguous():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.blend_forward(x.t(), x.t().contiguous(), None, 0.5)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.blend_backward(x.t(), None, None, None, 0.5)


@pytest.mark.parametrize(
    ("seed_out", "host_out", "alpha", "mode", "match"),
    [
        (torch.zeros(2, 4), torch.zeros(2, 4), 0.5, "mix", "mode"),
        (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4), 0.5, "blend", "float32"),
        (torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 4), 0.5, "blend", "float32"),
        (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float16), 0.5, "blend", "share"),
        (torch.zeros(2, 4), torch.zeros(2, 5), 0.5, "blend", "same shape"),
        (torch.zeros(2, 4), torch.zeros(2, 4, device="meta"), 0.5, "blend", "meta"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 2), "blend", "0-d or 1-d"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3), "blend", "divide"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(0), "blend", "divide"),
        (torch.zeros(()), torch.zeros(()), torch.zeros(1), "blend", "at least one dim"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros((), device="meta"), "blend", "meta"),
        (
            torch.zeros(2, 4),
            torch.zeros(2, 4),
            torch.zeros((), dtype=torch.int64),
            "blend",
            "alpha",
        ),
        (torch.zeros(2, 4), torch.zeros(2, 4), True, "blend", "alpha"),
        (torch.zeros(2, 4), torch.zeros(2, 4), "0.5", "blend", "alpha"),
        ([0.0], torch.zeros(1), 0.5, "blend", "seed_out"),
        # Past fp32 (the kernel's argument): the CPU path raised torch's overflow error, the
        # kernels returned inf. inf and NaN made NaN outputs on both.
        (torch.zeros(2, 4), torch.zeros(2, 4), 1e39, "blend", "fp32's range"),
        (torch.zeros(2, 4), torch.zeros(2, 4), float("inf"), "blend", "fp32's range"),
        (torch.zeros(2, 4), torch.zeros(2, 4), float("nan"), "blend", "fp32's range"),
        (torch.zeros(2, 4), torch.zeros(2, 4), 10**400, "blend", "fp32's range"),  # OverflowError
        (torch.zeros(2, 4), torch.zeros(2, 4), -(10**39), "blend", "fp32's range"),
    ],
)
def test_rejections(seed_out, host_out, alpha, mode, match):
    if mode not in ("blend", "incubate"):  # the oracle refuses an unknown mode too
        with pytest.raises(ValueError, match=match):
            alpha_blend_reference(seed_out, host_out, alpha, mode)
    with pytest.raises(ValueError, match=match):
        alpha_blend(seed_out, host_out, alpha, mode)
