"""The custom ops other than the KD ones (``test_kd_loss_opcheck``, and the fused-linear ones
in ``test_fused_linear_kd_compile``) under ``torch.library.opcheck``: schema, fake
implementations (shapes, dtypes and strides against the real outputs), autograd registration
and AOT dispatch of ``kasmina::alpha_blend`` and its backward (each kind of alpha, both modes),
``kasmina::grad_norms``, ``kasmina::leak_check`` and the two lifecycle ops, which mutate the
state table, on each backend (on the GPU when there is one)."""

from __future__ import annotations

import pytest
import torch

import kasmina.ops  # noqa: F401  (registers the custom ops)
from kasmina.stages import NUM_STATE_COLUMNS, SeedStage, StateColumn
from tests.ops.kd_helpers import DEVICE, KERNEL_WARNINGS, _gen

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]

_ALPHAS = ("float", "0-d", "per-chunk")


def _alpha(kind: str) -> tuple[torch.Tensor | None, float]:
    if kind == "float":
        return None, 0.4
    if kind == "0-d":
        return torch.tensor(0.3, requires_grad=True), 0.0
    return torch.tensor([0.2, 0.9], requires_grad=True), 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", _ALPHAS)
def test_the_blend_ops_pass_opcheck(backend: str, dtype: torch.dtype, kind: str) -> None:
    gen = _gen(7)
    seed = torch.randn(3, 8, generator=gen).to(dtype).requires_grad_()
    host = torch.randn(3, 8, generator=gen).to(dtype)
    grad = torch.randn(3, 8, generator=gen).to(dtype)
    alpha, value = _alpha(kind)
    for mode in ("blend", "incubate"):
        torch.library.opcheck(torch.ops.kasmina.alpha_blend, (seed, host, alpha, value, mode))
    plain = None if alpha is None else alpha.detach()
    for saved in ((seed.detach(), host), (None, None)):  # alpha's gradient wanted, or not
        args = (grad, *saved, plain, value)
        torch.library.opcheck(torch.ops.kasmina.alpha_blend_backward, args)


def test_the_norm_ops_pass_opcheck(backend: str) -> None:
    """A mixed list: ``None``, a transposed bf16 tensor (read in place by the kernel), an empty
    one and an fp16 one."""
    gen = _gen(8)
    tensors = [
        torch.randn(5, generator=gen),
        None,
        torch.randn(2, 3, generator=gen).bfloat16().t(),
        torch.zeros(0),
        torch.randn(4, generator=gen).half(),
    ]
    torch.library.opcheck(torch.ops.kasmina.grad_norms, (tensors, DEVICE))
    torch.library.opcheck(torch.ops.kasmina.leak_check, (tensors, 0.5, DEVICE))


def _state() -> torch.Tensor:
    state = torch.zeros(4, NUM_STATE_COLUMNS, dtype=torch.int32)
    state[2, StateColumn.LIFECYCLE_STAGE] = SeedStage.COOLDOWN
    state[2, StateColumn.EMBARGO_COUNTER] = 2
    return state


def test_the_lifecycle_ops_pass_opcheck(backend: str) -> None:
    """Applied, out-of-range, illegal and duplicated requests, with and without gates; opcheck
    runs each op several times on copies of the state and compares what it wrote."""
    idx = torch.tensor([0, 1, 1, 2, 7])
    new = torch.tensor([1, 1, 1, int(SeedStage.RECYCLING), 1], dtype=torch.int32)
    for gate in (None, torch.tensor([3, -1, 2, 4, 1])):
        args = (_state(), idx, new, gate)
        torch.library.opcheck(torch.ops.kasmina.lifecycle_update, args)
    torch.library.opcheck(torch.ops.kasmina.lifecycle_tick, (_state(),))
