"""A promotion into a fused SGD group with momentum, where some of the group's parameters have a
momentum buffer and some none: the host steps as unfused SGD would (docs/design.md §4 "ACTIVE")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina.isolation.optimizers import IsolatedOptimizerManager

PATHS = ["initialize_host_after_active", "seed_state_cleared", "host_state_reset"]


def grads(params: list[nn.Parameter], k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return [torch.randn(p.shape, generator=g) for p in params]


def put(params: list[nn.Parameter], gs: list[torch.Tensor]) -> None:
    for p, g in zip(params, gs, strict=True):
        p.grad = g.clone()


def sgd(params: list[nn.Parameter], fused: bool, options: dict) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=0.1, fused=fused, **options)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options",
    [
        {"momentum": 0.9, "weight_decay": 0.01},
        {"momentum": 0.9, "nesterov": True, "maximize": True},
        {"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01},
    ],
    ids=["plain", "nesterov", "dampening"],
)
def test_a_promotion_that_mixes_buffers_steps_as_unfused_sgd(path: str, options: dict) -> None:
    """INITIALIZE_HOST after a seed went ACTIVE under ``host_lr=None`` (the seed's buffers beside
    a fresh host's none), or a promotion at the safe point of a RESET_STATE or of a seed step
    whose state was cleared: torch's fused step raised (``expected Tensor ... got NoneType``) at
    every host step. Now two steps give the weights unfused SGD gives on the same gradients,
    each parameter without a buffer starting its momentum at its gradient."""
    torch.manual_seed(0)
    host, seed = nn.Linear(3, 3), nn.Linear(3, 3)
    ref_host, ref_seed = copy.deepcopy(host), copy.deepcopy(seed)
    hp, sp = list(host.parameters()), list(seed.parameters())
    rhp, rsp = list(ref_host.parameters()), list(ref_seed.parameters())
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    fused = {**options, "fused": True}
    ref_seed_opt, ref_host_opt = sgd(rsp, False, options), sgd(rhp, False, options)
    if path == "initialize_host_after_active":
        opts.create_seed_optimizer("s", sp, lr=0.1, **fused)
        put(sp, grads(sp, 1)), put(rsp, grads(sp, 1))
        opts.step("s"), ref_seed_opt.step()
        opts.initialize_host(hp, lr=0.1, **fused)
        carried = {p: ref_seed_opt.state[p] for p in rsp}
    else:
        opts.initialize_host(hp, lr=0.1, **fused)
        opts.create_seed_optimizer("s", sp, lr=0.1, **fused)
        put(hp + sp, grads(hp + sp, 1)), put(rhp + rsp, grads(hp + sp, 1))
        opts.step_many(["host", "s"]), ref_host_opt.step(), ref_seed_opt.step()
        reset = "s" if path == "seed_state_cleared" else "host"
        opts.reset_state(reset)
        kept = ref_host_opt if reset == "s" else ref_seed_opt
        carried = {p: kept.state[p] for p in (rhp if reset == "s" else rsp)}
    opts.promote_seed("s")
    reference = sgd(rhp + rsp, False, options)
    reference.state.update({p: copy.deepcopy(state) for p, state in carried.items()})
    host_opt = opts.optimizer("host")
    for k in (2, 3):
        put(hp + sp, grads(hp + sp, k)), put(rhp + rsp, grads(hp + sp, k))
        assert opts.step("host")  # raised TypeError
        reference.step()
        for p, q in zip(hp + sp, rhp + rsp, strict=True):
            # Fused and unfused torch differ in a last bit (a fused multiply-add): fp32's
            # tolerance, far below a first buffer of 0.5 (dampening) or 0 times the gradient.
            torch.testing.assert_close(p, q)
            buf, ref = host_opt.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"]
            torch.testing.assert_close(buf, ref)
    assert host_opt.param_groups[0]["fused"]  # with dampening: fused again once all have one
    assert not host_opt._optimizer_step_post_hooks


def test_a_group_unmixed_is_left_as_it_was() -> None:
    """A promotion that leaves the group all with buffers or all without adds none."""
    torch.manual_seed(0)
    host, seed = nn.Linear(3, 3), nn.Linear(3, 3)
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1, momentum=0.9, fused=True)
    opts.create_seed_optimizer("s", seed.parameters(), lr=0.1, momentum=0.9, fused=True)
    opts.promote_seed("s")
    assert not opts.optimizer("host").state


def test_a_saved_state_with_mixed_buffers_loads_settled() -> None:
    """A checkpoint written between such a promotion and the next step, before promotions
    settled the group, held the mix: every step after a resume or a rollback raised."""
    torch.manual_seed(0)
    host, seed = nn.Linear(3, 3), nn.Linear(3, 3)
    hp, sp = list(host.parameters()), list(seed.parameters())
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(hp, lr=0.1, momentum=0.9, fused=True)
    opts.create_seed_optimizer("s", sp, lr=0.1, momentum=0.9, fused=True)
    put(hp, grads(hp, 1))
    opts.step("host")
    opts.promote_seed("s")
    saved = copy.deepcopy(opts.state_dict())
    kept = saved["optimizers"]["host"]["state"]["state"]
    for index in range(len(hp), len(hp) + len(sp)):  # the seed's: no buffer, as saved then
        del kept[index]
    resumed = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    resumed.initialize_host(hp, lr=0.1, momentum=0.9, fused=True)
    resumed.create_seed_optimizer("s", sp, lr=0.1, momentum=0.9, fused=True)
    resumed.promote_seed("s")
    resumed.load_state_dict(saved)
    gs = grads(hp + sp, 2)
    put(hp + sp, gs)
    before = [p.detach().clone() for p in sp]
    assert resumed.step("host")  # raised TypeError
    for p, b, g in zip(sp, before, gs[len(hp) :], strict=True):
        torch.testing.assert_close(p, b - 0.1 * g)  # its first step: buffer = gradient
