"""The manager's per-step and measuring calls refuse a bad argument with ``ValueError`` before
anything changes, rather than reading it as "off" or failing deep inside."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from kasmina.isolation.stepping import checked_clip_norm
from kasmina.stages import SeedStage
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, Rig, host_params, make_config

# 10**400: an int past a float's range (its float() raised OverflowError out of the step)
BAD_CLIP_NORMS = [-1.0, -1e-9, math.nan, -math.inf, "1", True, [1.0], torch.tensor(1.0), 10**400]


def _backward(rig: Rig) -> None:
    loss = F.cross_entropy(rig.model(rig.x), rig.y) * 1e3  # large grads: a clip would bite
    rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())


def _grads(rig: Rig) -> list[torch.Tensor]:
    return [p.grad.clone() for p in rig.manager.require_registry().host_params]


@pytest.mark.parametrize("norm", BAD_CLIP_NORMS, ids=lambda v: f"{v!r:.12}")
def test_a_bad_grad_clip_norm_is_refused_before_the_step_changes_anything(
    rig: Rig, norm: object
) -> None:
    manager = rig.manager
    _backward(rig)
    params, grads, step = host_params(rig), _grads(rig), manager.global_step
    counters = dict(manager.counters)
    with pytest.raises(ValueError, match="grad_clip_norm must be"):
        manager.step(grad_clip_norm=norm)  # type: ignore[arg-type]
    assert manager.global_step == step and dict(manager.counters) == counters
    assert all(torch.equal(a, b) for a, b in zip(host_params(rig), params, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(_grads(rig), grads, strict=True))
    assert manager.step(grad_clip_norm=1.0)["host_stepped"]  # the same gradients step now
    assert manager.global_step == step + 1


def test_no_clipping_is_zero_or_none_and_a_norm_clips() -> None:
    assert checked_clip_norm(None) == checked_clip_norm(0) == checked_clip_norm(0.0) == 0.0
    assert checked_clip_norm(2) == 2.0 and checked_clip_norm(np.float32(0.5)) == 0.5
    assert type(checked_clip_norm(np.float64(1.5))) is float


@pytest.mark.parametrize("off", [None, 0, 0.0])
def test_a_step_without_clipping_takes_zero_or_none(rig: Rig, off: object) -> None:
    _backward(rig)
    report = rig.manager.step(grad_clip_norm=off)  # type: ignore[arg-type]
    assert report["host_stepped"] and not rig.manager.optimizers.last_grad_norm


def test_a_step_with_a_norm_clips(rig: Rig) -> None:
    _backward(rig)
    assert rig.manager.step(grad_clip_norm=0.5)["host_stepped"]
    assert rig.manager.optimizers.last_grad_norm  # the norms were measured, so clipped


def test_an_infinite_norm_skips_a_non_finite_step_without_clipping(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    rig = Rig(make_config(tmp_path, store), keyring, optimizer_cls=torch.optim.SGD)
    manager = rig.manager
    _backward(rig)
    before = host_params(rig)
    grads = _grads(rig)
    assert manager.step(grad_clip_norm=math.inf)["host_stepped"]
    for p, was, g in zip(host_params(rig), before, grads, strict=True):  # not scaled: SGD
        torch.testing.assert_close(p, was - 0.05 * g, rtol=0, atol=1e-6)
    _backward(rig)
    manager.require_registry().host_params[0].grad[0, 0] = math.inf
    before = host_params(rig)
    assert not manager.step(grad_clip_norm=math.inf)["host_stepped"]
    assert all(torch.equal(a, b) for a, b in zip(host_params(rig), before, strict=True))


@pytest.mark.parametrize("repeats", [0, -1, True, 2.5, "3", None], ids=repr)
def test_measure_dormant_overhead_refuses_fewer_than_one_repeat(rig: Rig, repeats: object) -> None:
    rig.train(1)  # the slot has run: a dormant sample exists, so a measurement would be made
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        rig.manager.measure_dormant_overhead(repeats)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        rig.manager.report.validate_performance_targets(repeats)  # type: ignore[arg-type]
    assert math.isfinite(rig.manager.measure_dormant_overhead(np.int64(2)))


def test_a_frozen_host_trains_its_seeds_on_through_every_stage(rig: Rig, mlp: str) -> None:
    """With the host frozen, the model's output has a gradient in ISOLATED_INIT (the seed's
    straight-through path) and none once a command moves the seed on: ``manager.backward``
    skips a loss that needs no gradient instead of raising from inside the user's loop."""
    seed_params = {id(p) for p in rig.slot.seeds.parameters()}
    for p in rig.model.parameters():
        if id(p) not in seed_params:
            p.requires_grad_(False)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == SeedStage.COMPATIBILITY_CHECK
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    assert not loss.requires_grad
    rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())
    rig.manager.step()
    rig.train(2)
    assert rig.stage(SEED0) == SeedStage.COMPATIBILITY_CHECK


def test_a_loss_without_a_graph_still_raises_while_the_host_trains(rig: Rig, mlp: str) -> None:
    """Only a frozen host's loss may come without a graph: a trainable host's loss computed by
    mistake under no_grad raises as ``loss.backward()`` does, not a step that trains nothing."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    with torch.no_grad():
        loss = F.cross_entropy(rig.model(rig.x), rig.y)
    with pytest.raises(RuntimeError, match="does not require grad"):
        rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())


@pytest.mark.parametrize("number", ["loss", "kd_loss"])
def test_a_loss_given_as_a_number_is_refused_before_any_backward(rig: Rig, number: str) -> None:
    """``manager.backward(loss.item())`` (or ``kd_loss=0.0``) raised an internal AttributeError
    ('float' object has no attribute 'requires_grad'); now a ``TypeError`` naming the argument,
    before any backward runs: no gradient is left behind, and the tensor then goes through."""
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    args = {"loss": loss, "kd_loss": None, number: 0.5}
    with pytest.raises(TypeError, match=f"takes {number} as the loss tensor .* got float"):
        rig.manager.backward(**args)  # type: ignore[arg-type]
    assert all(p.grad is None for p in rig.model.parameters())
    rig.manager.backward(loss)
    assert rig.manager.step()["host_stepped"]
