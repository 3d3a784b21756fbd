"""What the tests of the two KD ops (``kd_kl_loss``, ``fused_linear_kd_loss``) share: the
device they run on, the reduction names, seeded generators, and the warnings their kernels
raise on purpose under the interpreter. A test file of either op takes ``KERNEL_WARNINGS``
and the ``on_device`` fixture (tests/ops/conftest.py) in its ``pytestmark``."""

from __future__ import annotations

import pytest
import torch

REDUCTIONS = ("none", "sum", "mean", "batchmean")
# The kernels compute -inf - -inf = NaN, log2(0) = -inf and exp2 overflows to inf on purpose
# (masked lanes, all--inf rows; see kasmina.kernels.kd_loss); the interpreter's numpy warns.
KERNEL_WARNINGS = [
    pytest.mark.filterwarnings(f"ignore:{what} encountered:RuntimeWarning")
    for what in ("invalid value", "divide by zero", "overflow")
]


# CUDA when there is one (the compiled kernels; how perf/gpu_check.sh runs these tests), else
# the CPU, where the Triton backend runs through the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)
