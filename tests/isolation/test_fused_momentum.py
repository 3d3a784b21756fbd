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
        {"momentum": 0.9, "dampening": 0.5, "maximize": True},
    ],
    ids=["plain", "nesterov", "dampening", "dampening-maximize"],
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


DAMPENED = {"momentum": 0.9, "dampening": 0.5, "weight_decay": 0.01}


def promoted_beside_buffers() -> tuple:
    """A host stepped once (buffers) and a fresh seed promoted into it (none), fused SGD with
    dampening; with the unfused reference in the same state."""
    torch.manual_seed(0)
    host, seed = nn.Linear(3, 3), nn.Linear(3, 3)
    hp, sp = list(host.parameters()), list(seed.parameters())
    rhp = [p.detach().clone().requires_grad_() for p in hp]
    rsp = [p.detach().clone().requires_grad_() for p in sp]
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(hp, lr=0.1, fused=True, **DAMPENED)
    opts.create_seed_optimizer("s", sp, lr=0.1, fused=True, **DAMPENED)
    reference = sgd(rhp + rsp, False, DAMPENED)
    put(hp, grads(hp, 1)), put(rhp, grads(hp, 1))
    opts.step("host"), reference.step()
    for q in rhp:
        q.grad = None
    opts.promote_seed("s")
    return opts, hp, sp, reference, rhp, rsp


def hooks(optimizer: torch.optim.Optimizer) -> int:
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


def assert_matches(params: list, ref_params: list, optimizer, reference) -> None:
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q)
        if q in reference.state:
            buf = optimizer.state[p]["momentum_buffer"]
            torch.testing.assert_close(buf, reference.state[q]["momentum_buffer"])


def test_a_dampened_group_stays_fused_and_steps_as_unfused_sgd() -> None:
    """With dampening the group was set unfused until every parameter had a buffer (a flag a
    checkpoint then carried for good). Now it stays fused: each bare parameter gets, before
    its first step, a buffer the fused update turns into its gradient (within a last bit of
    fp32: 1 ulp of the buffer seen), and the hook that gives it is gone once none is bare."""
    opts, hp, sp, reference, rhp, rsp = promoted_beside_buffers()
    host_opt = opts.optimizer("host")
    assert host_opt.param_groups[0]["fused"] is True  # was False
    for k in (2, 3, 4):
        put(hp + sp, grads(hp + sp, k)), put(rhp + rsp, grads(hp + sp, k))
        assert opts.step("host")
        reference.step()
        assert host_opt.param_groups[0]["fused"] is True
        assert_matches(hp + sp, rhp + rsp, host_opt, reference)
        assert hooks(host_opt) == 0


def test_a_parameter_without_a_gradient_waits_then_starts_as_unfused_sgd() -> None:
    """A promoted parameter that gets no gradient for some steps kept the group unfused, and a
    hook looping over the group ran at every step. Now the group stays fused (torch's fused
    step leaves the parameter out), and its first gradient starts it as unfused SGD would."""
    opts, hp, sp, reference, rhp, rsp = promoted_beside_buffers()
    host_opt = opts.optimizer("host")
    stepped, ref_stepped = hp + sp[:1], rhp + rsp[:1]  # the seed's bias: no gradient yet
    for k in (2, 3, 4):
        put(stepped, grads(stepped, k)), put(ref_stepped, grads(stepped, k))
        sp[1].grad = rsp[1].grad = None
        assert opts.step("host")
        reference.step()
        assert host_opt.param_groups[0]["fused"] is True  # was False at every step
        assert_matches(hp + sp, rhp + rsp, host_opt, reference)
        assert len(host_opt._optimizer_step_pre_hooks) == 1  # the bias is still bare
    for k in (5, 6):
        put(hp + sp, grads(hp + sp, k)), put(rhp + rsp, grads(hp + sp, k))
        assert opts.step("host")
        reference.step()
        assert_matches(hp + sp, rhp + rsp, host_opt, reference)
    assert host_opt.param_groups[0]["fused"] is True
    assert hooks(host_opt) == 0


@pytest.mark.parametrize("into", ["fresh", "live"])
def test_a_state_saved_between_promotion_and_step_loads_fused(into: str) -> None:
    """A checkpoint or a rollback between such a promotion and the next step carried the group
    as unfused, and the load built new group dicts the hook no longer saw: the user's
    ``fused=True`` was lost for good. Now nothing saved differs from what the user set, and a
    load, into a fresh manager or the live one, steps fused as unfused SGD would."""
    opts, hp, sp, reference, rhp, rsp = promoted_beside_buffers()
    saved = copy.deepcopy(opts.state_dict())
    assert saved["optimizers"]["host"]["state"]["param_groups"][0]["fused"] is True
    if into == "fresh":
        opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
        opts.initialize_host(hp, lr=0.1, fused=True, **DAMPENED)
        opts.create_seed_optimizer("s", sp, lr=0.1, fused=True, **DAMPENED)
        opts.promote_seed("s")
    opts.load_state_dict(saved)
    host_opt = opts.optimizer("host")
    for k in (2, 3, 4):
        put(hp + sp, grads(hp + sp, k)), put(rhp + rsp, grads(hp + sp, k))
        assert opts.step("host")
        reference.step()
        assert host_opt.param_groups[0]["fused"] is True  # was False after the load
        assert_matches(hp + sp, rhp + rsp, host_opt, reference)
    assert hooks(host_opt) == 0


def test_a_step_a_grad_scaler_skips_gives_no_buffer() -> None:
    """Under a GradScaler the fused step unscales the gradients itself, or skips the step on
    an overflow: a first buffer is made from the unscaled gradient, and none at a skipped
    step (it would have stayed, made from infinities)."""
    opts, hp, sp, reference, rhp, rsp = promoted_beside_buffers()
    host_opt = opts.optimizer("host")
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # what a loop's scaled loss does: the scale made
    put(hp + sp, [g * 8.0 for g in grads(hp + sp, 2)])
    sp[0].grad[0, 0] = float("inf")
    scaler.step(host_opt), scaler.update()
    assert all("momentum_buffer" not in host_opt.state.get(p, {}) for p in sp)
    scale = scaler.get_scale()
    put(hp + sp, [g * scale for g in grads(hp + sp, 3)]), put(rhp + rsp, grads(hp + sp, 3))
    scaler.step(host_opt), reference.step()
    assert_matches(hp + sp, rhp + rsp, host_opt, reference)
    assert hooks(host_opt) == 0


def test_a_skipped_step_that_raised_gives_its_buffers_back_at_the_next() -> None:
    """A step a GradScaler skips that raises after the first buffers were made (another pre
    hook, the fused kernel) runs no post hook: the buffers made from its infinite gradients
    are taken back at the next step, which starts them from its own gradients as unfused SGD
    would (kept, the parameters' momentum stayed infinite for good)."""
    opts, hp, sp, reference, rhp, rsp = promoted_beside_buffers()
    host_opt = opts.optimizer("host")

    def refuse(*_args: object) -> None:
        raise RuntimeError("a later pre hook refused the step")

    refusing = host_opt.register_step_pre_hook(refuse)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))
    put(hp + sp, [g * 8.0 for g in grads(hp + sp, 2)])
    sp[0].grad[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="refused the step"):
        scaler.step(host_opt)
    refusing.remove()
    del host_opt.grad_scale, host_opt.found_inf  # GradScaler leaves them after a raise
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(torch.ones(()))
    put(hp + sp, [g * 4.0 for g in grads(hp + sp, 3)]), put(rhp + rsp, grads(hp + sp, 3))
    scaler.step(host_opt), reference.step()
    assert_matches(hp + sp, rhp + rsp, host_opt, reference)
    assert hooks(host_opt) == 0


def test_a_second_promotion_after_the_first_settled_gets_its_first_buffers() -> None:
    """The hook of a first promotion, gone once none of its parameters is bare, leaves the
    optimizer's entry: a second promotion into the same group (a fresh seed, no buffers
    beside the host's) gets a hook of its own that gives them, as unfused SGD starts them."""
    opts, hp, sp, reference, rhp, rsp = promoted_beside_buffers()
    host_opt = opts.optimizer("host")
    put(hp + sp, grads(hp + sp, 2)), put(rhp + rsp, grads(hp + sp, 2))
    assert opts.step("host")
    reference.step()
    assert hooks(host_opt) == 0
    torch.manual_seed(1)
    second = list(nn.Linear(3, 3).parameters())
    ref_second = [p.detach().clone().requires_grad_() for p in second]
    opts.create_seed_optimizer("t", second, lr=0.1, fused=True, **DAMPENED)
    opts.promote_seed("t")
    reference.add_param_group({"params": ref_second, "lr": 0.1, **DAMPENED})
    everything, ref_everything = hp + sp + second, rhp + rsp + ref_second
    for k in (3, 4):
        put(everything, grads(everything, k)), put(ref_everything, grads(everything, k))
        assert opts.step("host")  # the fused step met bare parameters: it raised
        reference.step()
        assert_matches(everything, ref_everything, host_opt, reference)
    assert hooks(host_opt) == 0


def test_a_state_loaded_while_parameters_wait_keeps_their_loaded_buffers() -> None:
    """A parameter waiting for its first buffer that a load gave one (a state saved after that
    step, into the live manager) keeps the loaded buffer: none is made over it."""
    opts, hp, sp, reference, rhp, rsp = promoted_beside_buffers()
    twin, thp, tsp, _, _, _ = promoted_beside_buffers()  # the same run, one step further
    put(thp + tsp, grads(hp + sp, 2)), put(rhp + rsp, grads(hp + sp, 2))
    assert twin.step("host")
    reference.step()
    opts.load_state_dict(copy.deepcopy(twin.state_dict()))
    with torch.no_grad():
        for p, q in zip(hp + sp, thp + tsp, strict=True):
            p.copy_(q)
    host_opt = opts.optimizer("host")
    for k in (3, 4):
        put(hp + sp, grads(hp + sp, k)), put(rhp + rsp, grads(hp + sp, k))
        assert opts.step("host")
        reference.step()
        assert_matches(hp + sp, rhp + rsp, host_opt, reference)
    assert hooks(host_opt) == 0


def test_a_fused_group_of_another_optimizer_is_left_as_it_was() -> None:
    """Only fused SGD takes no mix of buffers: a fused Adam group a seed stepped once is
    promoted into (its state beside the host's none) is left to Adam, which has no momentum
    hyperparameter to read, and steps."""
    torch.manual_seed(0)
    host, seed = nn.Linear(3, 3), nn.Linear(3, 3)
    hp, sp = list(host.parameters()), list(seed.parameters())
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.Adam)
    opts.initialize_host(hp, lr=0.1, fused=True)
    opts.create_seed_optimizer("s", sp, lr=0.1, fused=True)
    put(sp, grads(sp, 1))
    assert opts.step("s")
    opts.promote_seed("s")  # read group["momentum"] of an Adam group: KeyError
    host_opt = opts.optimizer("host")
    assert hooks(host_opt) == 0
    put(hp + sp, grads(hp + sp, 2))
    assert opts.step("host")
