"""A non-finite gradient that reaches an isolated seed from above (a NaN target, an overflowed
loss: the host's data, not the seed) costs the seed that step, as a host-made NaN in its input
does, and charges it no fault (docs/design.md §3 "Fault containment").

Taken, the NaN went into the seed's weights (no clipping) and its next, finite-input forward
was charged a fault: one bad batch quarantined a healthy seed within three steps.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.seeds.layer import KasminaLayer
from tests.seeds.fault_helpers import C, Net, make_seed
from tests.seeds.helpers import S, kernel, walk

ISOLATED = [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION]


def _nan_target(out: torch.Tensor, column: int) -> torch.Tensor:
    target = torch.zeros_like(out)
    target[1, column] = float("nan")
    return target


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_slot_seed_loses_the_step_of_a_nan_from_above_and_is_not_charged(stage) -> None:
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    for k in range(2):
        layer.seed(k).attach_kernel(kernel(2, 10 + k))
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10, 2.0)
    x = torch.randn(5, 6)
    out = layer(x)
    F.mse_loss(out, _nan_target(out, 0)).backward()  # the NaN reaches seed 0's chunk only
    hit, other = layer.seed(0), layer.seed(1)
    assert hit.poll_nonfinite() and not other.poll_nonfinite()
    assert hit.faults == other.faults == 0
    assert all(p.grad is None for p in hit.kernel.parameters())  # the step skips it
    assert all(p.grad is not None and p.grad.isfinite().all() for p in other.kernel.parameters())
    layer.zero_grad(set_to_none=True)
    F.mse_loss(layer(x), torch.zeros(5, 4)).backward()  # a clean batch trains it again
    assert not hit.poll_nonfinite() and hit.faults == 0
    assert all(p.grad is not None for p in hit.kernel.parameters())


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_stand_alone_seed_loses_the_step_of_a_nan_from_above(stage) -> None:
    seed = make_seed(kernel(C, 3), stage)
    net = Net(seed)
    out = net(torch.randn(4, 4))
    F.mse_loss(out, _nan_target(out, 1)).backward()
    assert seed.poll_nonfinite() and seed.faults == 0
    assert all(p.grad is None for p in seed.kernel.parameters())
