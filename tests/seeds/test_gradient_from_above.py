"""A non-finite gradient that reaches an isolated seed from above (a NaN target, an overflowed
loss: the host's data, not the seed) costs the seed that step, as a host-made NaN in its input
does, and charges it no fault (docs/design.md §3 "Fault containment").

Taken, the NaN went into the seed's weights (no clipping) and its next, finite-input forward
was charged a fault: one bad batch quarantined a healthy seed within three steps. Compiled,
where no guarded island runs the seed's backward, that is what happened, until the output's
identity in the compiled graph (``compiled_cut.from_above_tested``) marked the step lost too.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.seeds.compiled_cut import from_above_tested, settled_flags
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.fault_helpers import C, Net, make_seed
from tests.seeds.helpers import S, kernel, walk

ISOLATED = [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION]
MODES = pytest.mark.parametrize("compiled", [None, "aot_eager"], ids=["eager", "compiled"])


def _forward(module: nn.Module, compiled: str | None) -> nn.Module:
    """``module``, or compiled whole with that backend (``fullgraph``: no graph break)."""
    if compiled is None:
        return module
    torch._dynamo.reset()
    return torch.compile(module, backend=compiled, fullgraph=True)


def _nan_target(out: torch.Tensor, column: int) -> torch.Tensor:
    target = torch.zeros_like(out)
    target[1, column] = float("nan")
    return target


@MODES
@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_slot_seed_loses_the_step_of_a_nan_from_above_and_is_not_charged(
    stage, compiled: str | None
) -> None:
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    for k in range(2):
        layer.seed(k).attach_kernel(kernel(2, 10 + k))
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10, 2.0)
    forward = _forward(layer, compiled)
    x = torch.randn(5, 6)
    out = forward(x)
    F.mse_loss(out, _nan_target(out, 0)).backward()  # the NaN reaches seed 0's chunk only
    hit, other = layer.seed(0), layer.seed(1)
    assert hit.poll_nonfinite() and not other.poll_nonfinite()
    assert hit.faults == other.faults == 0
    assert all(p.grad is None for p in hit.kernel.parameters())  # the step skips it
    assert all(p.grad is not None and p.grad.isfinite().all() for p in other.kernel.parameters())
    layer.zero_grad(set_to_none=True)
    F.mse_loss(forward(x), torch.zeros(5, 4)).backward()  # a clean batch trains it again
    assert not hit.poll_nonfinite() and hit.faults == 0
    assert all(p.grad is not None for p in hit.kernel.parameters())


@MODES
@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_stand_alone_seed_loses_the_step_of_a_nan_from_above(stage, compiled: str | None) -> None:
    seed = make_seed(kernel(C, 3), stage)
    net = _forward(Net(seed), compiled)
    out = net(torch.randn(4, 4))
    F.mse_loss(out, _nan_target(out, 1)).backward()
    assert seed.poll_nonfinite() and seed.faults == 0
    assert all(p.grad is None for p in seed.kernel.parameters())


def test_a_compiled_slot_keeps_the_loss_of_a_first_backward_through_a_retained_graph() -> None:
    """A seed-only backward (KD's) with the NaN, then the task loss's through the same graph,
    finite: the step stays lost. (A flag the forward writes too was written back by the second
    backward from its value after the forward; a slot's view of it was saved and refused.)"""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    for k in range(2):
        layer.seed(k).attach_kernel(kernel(2, 10 + k))
        walk(layer.seed(k), S.GRAFTING)
    out = _forward(layer, "aot_eager")(torch.randn(5, 6))
    F.mse_loss(out, _nan_target(out, 0)).backward(retain_graph=True)
    F.mse_loss(out, torch.zeros(5, 4)).backward()
    hit, other = layer.seed(0), layer.seed(1)
    assert hit.poll_nonfinite() and not other.poll_nonfinite()
    assert hit.faults == other.faults == 0
    assert all(p.grad is None for p in hit.kernel.parameters())


@pytest.mark.parametrize("value", [1.0, math.inf, math.nan], ids=["finite", "inf", "nan"])
def test_the_compiled_test_passes_the_gradient_and_sets_the_flag_where_it_is_not_finite(
    value: float,
) -> None:
    out = torch.randn(3, 2, requires_grad=True)
    flag = torch.zeros((), dtype=torch.bool)
    grad = torch.full((3, 2), value)
    from_above_tested(out, flag).backward(grad)
    torch.testing.assert_close(out.grad, grad, equal_nan=True, rtol=0, atol=0)  # the step drops it
    assert bool(flag) is not math.isfinite(value)


def test_a_half_gradient_from_above_is_tested_by_its_fp32_sum() -> None:
    """Finite fp16 entries whose sum overflows fp16 (4 x 60000 > 65504) are a finite gradient,
    as the eager guard's test (``faults.all_finite``, summed in fp32) has it: summed in their
    own dtype, they lost the step."""
    out = torch.randn(4, dtype=torch.float16, requires_grad=True)
    for value, lost in ((60000.0, False), (math.inf, True)):
        flag = torch.zeros((), dtype=torch.bool)
        from_above_tested(out, flag).backward(torch.full((4,), value, dtype=torch.float16))
        assert bool(flag) is lost


@pytest.mark.parametrize("stage", list(SeedStage), ids=lambda s: s.name)
def test_a_set_cut_flag_is_a_lost_step_in_the_isolated_stages_only(stage: SeedStage) -> None:
    """Only an isolated kernel's output goes through ``from_above_tested``: there the flag is a
    lost step, no cut; in every other stage it keeps its meaning (ACTIVE's compiled cut, a
    fault), and a clean flag is left as read everywhere."""
    seed = SimpleNamespace(stage=stage)
    lost = stage in ISOLATED
    for faulted in (False, True):
        got = settled_flags([True, faulted, True], seed)
        assert got == ([False, faulted, False] if lost else [True, faulted, True])
        assert settled_flags([True, faulted, False], seed) == [True, faulted, False]
        assert settled_flags([False, faulted, False], seed) == [False, faulted, False]
