"""The host optimizer as a user shapes it after attach (docs/design.md §4): created late by
INITIALIZE_HOST, it takes one step's gradient; a param group the user adds (gradual
unfreezing) is taken up at the next step and rebuilt by a ROLLBACK into the live optimizer; a
group over a seed's parameters is refused at the next step, before anything steps."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import tests.manager.helpers as helpers
from kasmina.control.auth import sign_command
from kasmina.control.builders import make_optimizer_command, make_rollback_command
from kasmina.errors import ParameterOverlapError
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, Host, Rig, S, make_config, run_command
from tests.manager.test_host_optimizer import walk_to_active


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def test_a_late_host_optimizer_applies_one_steps_gradient(tmp_path, store, keyring: Keyring):
    """attach(host_lr=None): step() leaves the host's gradients alone (a trainer may step the
    host itself); INITIALIZE_HOST drops those that piled up, so its first step is one step."""
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = Host()
    manager.attach(model, "out", 2, 2, host_lr=None, optimizer_cls=torch.optim.SGD)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for _ in range(3):
        manager.backward(F.cross_entropy(model(x), y))
        assert not manager.step()["host_stepped"]
    params = manager.require_registry().host_params
    assert all(p.grad is not None for p in params)
    init = sign_command(
        make_optimizer_command("initialize_host", learning_rate=0.25), keyring, "ctl"
    )
    assert run_command(manager, init.SerializeToString())
    assert all(p.grad is None for p in params)
    before = [p.detach().clone() for p in params]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, retain_graph=True)  # this step's alone
    manager.backward(loss)
    assert manager.step()["host_stepped"]
    for p, old, grad in zip(params, before, grads, strict=True):
        torch.testing.assert_close(p.detach(), old - 0.25 * grad)


def test_a_step_found_leaking_leaves_a_trainers_own_host_optimizer_nothing_to_apply(
    tmp_path, store, keyring: Keyring, mlp
) -> None:
    """Under attach(host_lr=None) the trainer steps the host itself, after ``step()``. A step
    the isolation check found not clean kept the host's gradients, leaked part included, for
    that optimizer to apply; the manager's own host optimizer skips such a step."""
    config = make_config(tmp_path, store, guard_seed_backward=False)
    rig = Rig(config, keyring, host_lr=None)
    manager = rig.manager
    own = torch.optim.SGD(manager.require_registry().host_params, lr=0.1)
    assert rig.send("germinate", SEED0, mlp)
    kernel, weight = manager.seed(SEED0).kernel, rig.model.inp.weight
    forward = kernel.forward
    kernel.forward = lambda x: forward(x) + 0.1 * weight.sum()  # a path into a host weight
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    assert weight.grad is not None
    before = [p.detach().clone() for p in manager.require_registry().host_params]
    report = manager.step()
    assert not report["isolation_clean"] and not report["host_stepped"]
    assert all(p.grad is None for p in manager.require_registry().host_params)
    own.step()
    after = manager.require_registry().host_params
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    kernel.forward = forward
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    assert manager.step()["isolation_clean"] and weight.grad is not None  # the next one is


def test_the_readme_grad_scaler_recipe_with_an_own_host_optimizer_survives_a_leak(
    tmp_path, store, keyring: Keyring, mlp
) -> None:
    """``scaler.step`` asserts that ``unscale_`` recorded an inf check, which a step whose
    gradients were dropped gives none: the README's order (unscale every optimizer, the
    trainer's own included, before ``manager.step()``) keeps a contained leak from raising."""
    config = make_config(tmp_path, store, guard_seed_backward=False)
    rig = Rig(config, keyring, host_lr=None)
    manager = rig.manager
    own = torch.optim.SGD(manager.require_registry().host_params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    assert rig.send("germinate", SEED0, mlp)
    kernel, weight = manager.seed(SEED0).kernel, rig.model.inp.weight
    forward = kernel.forward
    for leak in (True, False):
        kernel.forward = (lambda x: forward(x) + 0.1 * weight.sum()) if leak else forward
        before = weight.detach().clone()
        manager.backward(scaler.scale(F.cross_entropy(rig.model(rig.x), rig.y)))
        for optimizer_id in manager.optimizers.optimizer_ids:
            scaler.unscale_(manager.optimizers.optimizer(optimizer_id))
        scaler.unscale_(own)
        assert manager.step()["isolation_clean"] is not leak
        scaler.step(own)
        scaler.update()
        own.zero_grad()
        assert torch.equal(weight, before) is leak


class FrozenOut(Host):
    """The slot's layer frozen at attach, to be unfrozen later (gradual unfreezing)."""

    def __init__(self) -> None:
        super().__init__()
        self.out.requires_grad_(False)


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_an_unfrozen_layers_group_survives_rollbacks(
    monkeypatch, tmp_path, store, keyring: Keyring, mlp, mode
):
    monkeypatch.setattr(helpers, "Host", FrozenOut)
    config = make_config(tmp_path, store, checkpoint_mode=mode, performance_gate=0)
    rig = Rig(config, keyring)
    manager = rig.manager
    host_opt = manager.optimizers.optimizer("host")
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    layer = list(rig.model.out.host.parameters())
    for p in layer:
        p.requires_grad_(True)
    host_opt.add_param_group({"params": layer, "lr": 0.02})
    sched = torch.optim.lr_scheduler.LambdaLR(host_opt, [lambda s: 1.0, lambda s: 0.9**s])

    def train(steps: int) -> None:
        for _ in range(steps):
            assert rig.train(1)["host_stepped"]
            sched.step()

    registry = manager.require_registry()

    def host_side() -> set[int]:  # what the KD leak check and new monitors guard
        return set(_ids(registry.host_side_params()))

    assert set(_ids(layer)) <= host_side()  # unfrozen: on the host side at once
    manager.end_epoch(0)  # no step since: its checkpoint takes the group up
    assert manager.optimizers.owner_of(layer[0]) == "host"
    assert set(_ids(layer)) <= host_side()
    epoch = walk_to_active(rig, train, 1)
    seed_params = manager.seed(SEED0).seed_parameters()
    assert manager.optimizers.promoted()[SEED0][0] == 1  # the group holding the slot's layer
    train(1)
    manager.end_epoch(epoch)
    saved_lr = host_opt.param_groups[1]["lr"]
    for group in host_opt.param_groups:
        group["lr"] = 0.5  # after the checkpoint

    assert run_command(manager, rig.signed(make_rollback_command(epoch, reason="test")))
    assert manager.optimizers.optimizer("host") is host_opt and len(host_opt.param_groups) == 2
    assert host_opt.param_groups[1]["lr"] == saved_lr
    assert _ids(host_opt.param_groups[1]["params"]) == _ids(layer + seed_params)
    train(1)

    # Back before the promotion: the seed has its own optimizer, the group the layer only.
    assert run_command(manager, rig.signed(make_rollback_command(0, reason="test")))
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.optimizers.seed_ids == [SEED0]
    assert manager.optimizers.optimizer("host") is host_opt
    assert _ids(host_opt.param_groups[1]["params"]) == _ids(layer)
    assert set(_ids(layer)) <= host_side()
    monitor = registry[SEED0].monitor  # the restored seed's, built with the layer on its host side
    assert monitor is not None and set(_ids(layer)) <= {id(p) for _, p in monitor._host}
    train(2)  # the scheduler still drives both groups
    assert host_opt.param_groups[1]["lr"] == sched.get_last_lr()[1]


def _frozen_out_rig(monkeypatch, tmp_path, store, keyring: Keyring, **overrides):
    """A rig over ``FrozenOut`` after one step, and the slot's layer (frozen at attach)."""
    monkeypatch.setattr(helpers, "Host", FrozenOut)
    rig = Rig(make_config(tmp_path, store, **overrides), keyring)
    rig.train(1)
    return rig, list(rig.model.out.host.parameters())


def _unfreeze(layer: list[torch.nn.Parameter]) -> None:
    for p in layer:
        p.requires_grad_(True)


def test_a_layer_unfrozen_without_a_group_stops_the_step_until_one_holds_it(
    monkeypatch, tmp_path, store, keyring: Keyring
) -> None:
    """``requires_grad_(True)`` on a layer frozen at attach, no ``add_param_group``: nothing
    would step it, and its gradients would pile up step after step. The step refuses, naming
    it, before anything changes; once a group holds it, it trains."""
    rig, layer = _frozen_out_rig(monkeypatch, tmp_path, store, keyring)
    manager = rig.manager
    _unfreeze(layer)
    before = [p.detach().clone() for p in rig.model.parameters()]
    step = manager.global_step
    with pytest.raises(RuntimeError, match=r"out\.host\.weight.*frozen when the manager"):
        rig.train(1)
    assert manager.global_step == step
    assert all(torch.equal(a, b) for a, b in zip(before, rig.model.parameters(), strict=True))
    manager.optimizers.optimizer("host").add_param_group({"params": layer})
    assert rig.train(1)["host_stepped"]
    assert not torch.equal(layer[0], before[2])


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_rollback_unfreezes_what_its_checkpoint_trained(
    monkeypatch, tmp_path, store, keyring: Keyring, mode: str
) -> None:
    """Back to 0, before the unfreeze: the group goes, and the layer, left trainable, made
    every later step raise (no group held it) though the loop had added its group once; it
    is frozen again, as it was then. Forward to 1, whose groups hold it: the group came back
    and the layer stayed frozen, never training again, every step reported stepped. The
    checkpoint records which parameters frozen at attach trained; a resumed process, whose
    model is built frozen, gets them back the same way."""
    overrides = {"checkpoint_mode": mode, "run_id": "unfreeze"}
    rig, layer = _frozen_out_rig(monkeypatch, tmp_path, store, keyring, **overrides)
    manager = rig.manager
    manager.end_epoch(0)
    _unfreeze(layer)
    manager.optimizers.optimizer("host").add_param_group({"params": layer})
    rig.train(1)
    manager.end_epoch(1)
    assert run_command(manager, rig.signed(make_rollback_command(0, reason="test")))
    assert not any(p.requires_grad for p in layer)
    assert rig.train(1)["host_stepped"]
    assert run_command(manager, rig.signed(make_rollback_command(1, reason="test")))
    assert all(p.requires_grad for p in layer)
    before = layer[0].detach().clone()
    assert rig.train(1)["host_stepped"] and not torch.equal(layer[0], before)
    if mode == "memory":
        return
    manager.close()
    config = make_config(tmp_path, store, **overrides)
    resumed = Rig(config, keyring, record=False)  # the model built frozen again
    again = list(resumed.model.out.host.parameters())
    assert run_command(resumed.manager, resumed.signed(make_rollback_command(1, reason="r")))
    assert all(p.requires_grad for p in again)
    assert resumed.train(1)["host_stepped"]


def test_a_rollback_to_a_layer_waiting_for_its_group_freezes_it(
    monkeypatch, tmp_path, store, keyring: Keyring
) -> None:
    """The checkpoint was written between the unfreeze and the group (its layer trainable, no
    group holding it): restored trainable, every step after the rollback raised, the loop
    having added its group once already. Frozen again, as a step would have it."""
    rig, layer = _frozen_out_rig(monkeypatch, tmp_path, store, keyring)
    manager = rig.manager
    _unfreeze(layer)
    manager.end_epoch(0)  # no step since the unfreeze: no group yet
    manager.optimizers.optimizer("host").add_param_group({"params": layer})
    rig.train(1)
    assert run_command(manager, rig.signed(make_rollback_command(0, reason="test")))
    assert not any(p.requires_grad for p in layer)
    assert rig.train(1)["host_stepped"]


def test_a_rollback_leaves_a_trainer_stepped_layer_as_it_is(
    monkeypatch, tmp_path, store, keyring: Keyring
) -> None:
    """attach(host_lr=None): the trainer's own optimizer, which no rollback restores, steps the
    layer; the rollback leaves its flag to the trainer's loop."""
    monkeypatch.setattr(helpers, "Host", FrozenInp)
    rig = Rig(make_config(tmp_path, store), keyring, host_lr=None)
    manager, weight = rig.manager, rig.model.inp.weight
    rig.train(1)
    manager.end_epoch(0)
    weight.requires_grad_(True)
    rig.train(1)
    manager.end_epoch(1)
    assert run_command(manager, rig.signed(make_rollback_command(0, reason="test")))
    assert weight.requires_grad


def test_commands_go_on_while_an_unfrozen_layer_waits_for_its_group(
    monkeypatch, tmp_path, store, keyring: Keyring, mlp
) -> None:
    """Only the step refuses: a command that arrives between ``requires_grad_(True)`` and
    ``add_param_group`` applies (it was refused, and used up, with the step's reason)."""
    monkeypatch.setattr(helpers, "Host", FrozenOut)
    rig = Rig(make_config(tmp_path, store), keyring)
    layer = list(rig.model.out.host.parameters())
    for p in layer:
        p.requires_grad_(True)
    assert rig.send("germinate", SEED0, mlp)
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    with pytest.raises(RuntimeError, match="frozen when the manager"):
        rig.train(1)
    rig.manager.optimizers.optimizer("host").add_param_group({"params": layer})
    assert rig.train(1)["host_stepped"]


class FrozenInp(Host):
    """The first layer frozen at attach, unfrozen later by the trainer that steps the host."""

    def __init__(self) -> None:
        super().__init__()
        self.inp.requires_grad_(False)


def test_a_layer_unfrozen_under_a_trainers_own_optimizer_is_on_the_host_side(
    monkeypatch, tmp_path, store, keyring: Keyring, mlp
) -> None:
    """attach(host_lr=None) with a layer frozen, unfrozen before a GERMINATE: the seed's
    isolation check guards it as any host parameter (it went unwatched: a seed's path into it
    trained it through the trainer's optimizer, every step clean)."""
    monkeypatch.setattr(helpers, "Host", FrozenInp)
    rig = Rig(make_config(tmp_path, store, guard_seed_backward=False), keyring, host_lr=None)
    manager, weight = rig.manager, rig.model.inp.weight
    weight.requires_grad_(True)
    assert id(weight) in set(_ids(manager.require_registry().host_side_params()))
    assert rig.send("germinate", SEED0, mlp)
    kernel = manager.seed(SEED0).kernel
    forward = kernel.forward
    kernel.forward = lambda x: forward(x) + 0.1 * weight.sum()  # a path into the layer
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    report = manager.step()
    assert not report["isolation_clean"] and weight.grad is None  # dropped, as the host's


class Deep(Host):
    """The test host with a layer between its two that no slot wraps."""

    def __init__(self) -> None:
        super().__init__()
        self.mid = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


def test_weight_norm_on_a_layer_after_attach_is_refused_for_what_it_is(
    tmp_path, store, keyring: Keyring
) -> None:
    """``weight_norm`` after attach makes parameters over the old weight's memory, which the
    host optimizer still holds: adding them (the fix for a replaced module) would step that
    memory twice and is refused as an overlap. The step names the cause and the way out."""

    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = Deep()
    manager.attach(model, "out", 2, 2, host_lr=0.05)
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))
    torch.nn.utils.parametrizations.weight_norm(model.mid)
    manager.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="mid.parametrizations.weight.original1.*before attach"):
        manager.step()
    held = {id(p) for g in manager.optimizers.optimizer("host").param_groups for p in g["params"]}
    new = [p for p in model.parameters() if id(p) not in held and p.requires_grad]
    manager.optimizers.optimizer("host").add_param_group({"params": new})
    with pytest.raises(RuntimeError, match="Reparametrize the model before attach"):
        manager.step()


def test_a_seeds_parameters_added_to_the_host_optimizer_are_refused(rig: Rig, mlp):
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    seed_params = manager.seed(SEED0).seed_parameters()
    host_opt = manager.optimizers.optimizer("host")
    host_opt.add_param_group({"params": seed_params, "lr": 0.05})
    before = [p.detach().clone() for p in rig.model.parameters()]
    step = manager.global_step
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    with pytest.raises(ParameterOverlapError, match="add_param_group"):
        manager.step()
    assert manager.global_step == step and manager.optimizers.owner_of(seed_params[0]) == SEED0
    assert all(torch.equal(a, p) for a, p in zip(before, rig.model.parameters(), strict=True))
    del host_opt.param_groups[1]  # the user's fix: training goes on
    assert rig.train(1)["seeds_stepped"] == [SEED0]


def test_a_seed_promoted_before_the_next_step_joins_the_group_just_added(
    monkeypatch, tmp_path, store, keyring: Keyring, mlp
):
    """A user unfreezes the slot's layer (add_param_group) and the ADVANCE to ACTIVE applies at
    the next safe point with no step between: the seed joins the layer's new group, as it would
    had a step taken the group up first, not the host's first group."""
    monkeypatch.setattr(helpers, "Host", FrozenOut)
    rig = Rig(make_config(tmp_path, store, performance_gate=0), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    for _ in range(2):
        assert rig.send("advance", SEED0), manager.command_log[-1]
        rig.train(1)
    rig.train(4)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.STABILIZATION
    rig.train(1)
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    layer = list(rig.model.out.host.parameters())
    for p in layer:
        p.requires_grad_(True)
    host_opt = manager.optimizers.optimizer("host")
    host_opt.add_param_group({"params": layer, "lr": 0.02})
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.ACTIVE
    seed_params = manager.seed(SEED0).seed_parameters()
    assert manager.optimizers.promoted()[SEED0][0] == 1
    assert _ids(host_opt.param_groups[1]["params"]) == _ids(layer + seed_params)
    assert rig.train(1)["host_stepped"]


def test_a_rollback_to_before_a_replaced_layers_group_makes_the_step_say_so(
    tmp_path, store, keyring: Keyring
) -> None:
    """A layer replaced after attach is refused by the step until ``add_param_group`` holds it.
    A ROLLBACK to an epoch before that group rebuilt the host's groups without it, and since
    nothing had registered a module since the last check, no step looked again: the layer got
    gradients and was never stepped, every step reporting ``host_stepped``. The step after the
    rollback refuses again, naming it, until a group holds it."""

    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = Deep()
    manager.attach(model, "out", 2, 2, host_lr=0.05)
    x, y = torch.randn(4, 6), torch.randint(0, 4, (4,))

    def step() -> dict:
        manager.backward(F.cross_entropy(model(x), y))
        return manager.step()

    step()
    manager.end_epoch(0)
    model.mid = torch.nn.Linear(8, 8)
    with pytest.raises(RuntimeError, match=r"\['mid.weight', 'mid.bias'\].*add_param_group"):
        step()
    host = manager.optimizers.optimizer("host")
    host.add_param_group({"params": list(model.mid.parameters())})
    step()
    manager.end_epoch(1)
    raw = sign_command(make_rollback_command(0), keyring, "ctl").SerializeToString()
    assert run_command(manager, raw)
    with pytest.raises(RuntimeError, match=r"\['mid.weight', 'mid.bias'\].*add_param_group"):
        step()
    host.add_param_group({"params": list(model.mid.parameters())})
    weight = model.mid.weight.detach().clone()
    assert step()["host_stepped"] and not torch.equal(weight, model.mid.weight)
    manager.close()
