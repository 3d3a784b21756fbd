"""Fixtures of the seeds tests: ``x``, the fault tests' batch for the small host (``Net``)."""

from __future__ import annotations

import pytest
import torch

from tests.seeds.fault_helpers import BATCH


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(BATCH, 4)
