"""The gradient of a chunk that fell back in a mixed slot (``fallback_per_chunk``, the per-op
path of a slot where ISOLATED_INIT or ACTIVE seeds run; docs/design.md §6a).

An ACTIVE seed's kernel sees an alias of the host's chunk, so its backward reaches the host:
where its output was not finite the chunk falls back to the host's, and the gradient the
kernel would still send upstream (``0 * inf``: NaN) is cut at its input.
"""

from __future__ import annotations

import torch

from kasmina.seeds.faults import fallback_per_chunk
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage as S


def test_an_active_chunk_that_fell_back_sends_no_nan_upstream() -> None:
    seeds = [GradientIsolatedSeed(2, "s0"), GradientIsolatedSeed(2, "s1")]
    plan = (S.ISOLATED_INIT, S.ACTIVE)
    host = torch.randn(4, 2)
    x = torch.randn(4, 2, requires_grad=True)
    xin = x.view_as(x)  # the ACTIVE kernel's input, an alias of its chunk (``call_kernel``)
    out = xin @ torch.full((2, 2), float("inf"))  # not finite; its backward: 0 * inf = NaN
    ok = torch.tensor([True, False])
    full, alphas = fallback_per_chunk(
        seeds, plan, [host, out], [host, x], {1: xin}, ok, -1, torch.ones(())
    )
    assert alphas is None and torch.equal(full[:, 2:], x.detach())  # the host's chunk
    full.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 2))  # the host's own gradient, nothing from the kernel
