"""A param group added to the host optimizer (``add_param_group``) over a parameter the model
does not hold: the next step refuses it by name, before anything steps, and training goes on
once the group is removed, also when a seed was promoted into the host optimizer while the
group was waiting."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, Rig, S, make_config, to_stabilization

REFUSAL = "holds a parameter the model does not: register it first"


def _params(rig: Rig) -> list[torch.Tensor]:
    return [p.detach().clone() for p in rig.model.parameters()]


def test_a_group_over_a_parameter_the_model_lacks_is_refused_and_nothing_steps(
    rig: Rig, mlp: str
) -> None:
    """The step raises ``ValueError`` naming ``add_param_group``; no weight or step count
    changes, and the gradients are kept. Removing the group, the same gradients
    step as usual."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    host_opt = manager.optimizers.optimizer("host")
    groups = len(host_opt.param_groups)
    host_opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))], "lr": 0.01})
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y), kd_loss=manager.collect_kd_losses())
    before, step = _params(rig), manager.global_step
    grad = rig.model.inp.weight.grad.clone()
    with pytest.raises(ValueError, match=r"add_param_group\) " + REFUSAL):
        manager.step()
    assert manager.global_step == step
    assert all(torch.equal(a, b) for a, b in zip(before, _params(rig), strict=True))
    assert torch.equal(rig.model.inp.weight.grad, grad)
    host_opt.param_groups.pop()
    assert len(host_opt.param_groups) == groups
    report = manager.step()  # the user's fix: the kept gradients step
    assert manager.global_step == step + 1
    assert report["host_stepped"] and report["seeds_stepped"] == [SEED0]
    assert not torch.equal(rig.model.inp.weight, before[0])


def test_a_promotion_while_such_a_group_waits_still_applies(
    tmp_path, store, keyring: Keyring, mlp: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ADVANCE to ACTIVE takes up the groups added since the last step first; one it must
    refuse does not stop the promotion (it is logged), and the next step refuses it. Once
    removed, the promoted seed trains in the host optimizer."""
    rig = Rig(make_config(tmp_path, store, performance_gate=0), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    host_opt = manager.optimizers.optimizer("host")
    foreign = nn.Parameter(torch.zeros(3))
    host_opt.add_param_group({"params": [foreign], "lr": 0.01})
    with caplog.at_level(logging.WARNING, logger="kasmina.manager.slots"):
        assert rig.send("advance", SEED0), manager.command_log[-1]
    assert rig.stage(SEED0) == S.ACTIVE
    assert SEED0 not in manager.optimizers.seed_ids
    assert "host param groups not taken up before a promotion" in caplog.text
    assert REFUSAL in caplog.text
    before, step = _params(rig), manager.global_step
    with pytest.raises(ValueError, match=REFUSAL):
        rig.train(1)
    assert manager.global_step == step
    assert all(torch.equal(a, b) for a, b in zip(before, _params(rig), strict=True))
    host_opt.param_groups.pop()
    seed_params = manager.seed(SEED0).seed_parameters()
    held = {id(p) for g in host_opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in seed_params)  # promoted into the host optimizer
    kernel_before = [p.detach().clone() for p in seed_params]
    assert rig.train(1)["host_stepped"]
    assert any(not torch.equal(a, b) for a, b in zip(kernel_before, seed_params, strict=True))
