"""``kasmina::kd_kl_loss`` and ``kasmina::kd_kl_loss_backward`` under ``torch.library.opcheck``:
schema, fake implementations (shapes, dtypes and strides against the real outputs), autograd
registration and AOT dispatch, for every reduction, with and without a mask, and for a strided
student whose gradient keeps its strides (``kd_layout.grad_strides``). The Triton kernels are
checked without a mask: they leave a masked row's statistics unwritten (documented), which
opcheck's comparison of every output would read."""

from __future__ import annotations

import os

import pytest
import torch

import kasmina.ops.kd_loss  # noqa: F401  (registers the custom ops)
from tests.ops.kd_helpers import KERNEL_WARNINGS, REDUCTIONS

pytestmark = KERNEL_WARNINGS


def _inputs(strided: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(3, 5, 12, generator=gen)
    student = full[:, :, :11] if strided else full[:, :, :11].contiguous()  # rows' phase odd
    teacher = torch.randn(3, 5, 11, generator=gen).bfloat16()
    mask = torch.rand(3, 5, generator=gen) > 0.3
    return student, teacher, mask


def _check(reduction: str, masked: bool, strided: bool) -> None:
    student, teacher, mask = _inputs(strided)
    m = mask if masked else None
    forward = (student.requires_grad_(), teacher, m, 2.0, reduction, True)
    torch.library.opcheck(torch.ops.kasmina.kd_kl_loss, forward)
    with torch.no_grad():
        loss, stats, scale = torch.ops.kasmina.kd_kl_loss(*forward)
    grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(4)) + 0.5
    backward = (student.detach(), teacher, m, stats, scale, grad_output, 2.0, reduction)
    torch.library.opcheck(torch.ops.kasmina.kd_kl_loss_backward, backward)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_the_kd_ops_pass_opcheck_on_the_cpu_path(
    monkeypatch: pytest.MonkeyPatch, reduction: str, masked: bool, strided: bool
) -> None:
    monkeypatch.setenv("KASMINA_BACKEND", "reference")
    _check(reduction, masked, strided)


def test_the_kd_ops_pass_opcheck_on_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """One reduction (the interpreter is slow): the fakes are the CPU path's, checked above for
    every one; here the kernels' real outputs (the loss rows, the statistics, the gradient laid
    out as the strided student) are checked against them."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels on a CPU need TRITON_INTERPRET=1")
    monkeypatch.setenv("KASMINA_BACKEND", "triton")
    _check("none", masked=False, strided=True)
