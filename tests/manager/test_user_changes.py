"""What a user may do to a managed model between steps, and what the manager then says:
``kasmina.detach`` (refused by ``step()``) and ``requires_grad_(False)`` on the seeds (warned
and counted)."""

from __future__ import annotations

import logging

import pytest
import torch

import kasmina
from tests.manager.helpers import SEED0, Rig, S, host_params


def test_a_step_refuses_a_model_whose_slots_were_detached(rig: Rig, mlp) -> None:
    """``kasmina.detach`` on a managed model takes its slots out: the seeds never run again,
    so ``step()`` refuses before it changes anything, as for replaced parameters."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    kasmina.detach(rig.model)
    before, step = host_params(rig), manager.state.global_step
    with pytest.raises(RuntimeError, match=r"\['out'\] were taken out of the model"):
        manager.step()
    assert manager.state.global_step == step
    assert all(torch.equal(a, b) for a, b in zip(before, host_params(rig), strict=True))


def test_seeds_whose_parameters_are_frozen_are_warned_and_counted(
    rig: Rig, mlp, caplog: pytest.LogCaptureFixture
) -> None:
    """``model.requires_grad_(False)`` mid-growth (the host unfrozen again) leaves a training
    seed nothing to train: each step lists it under ``frozen``, counts it and logs a WARNING
    (the first, then every 1000th). ``requires_grad`` is the user's, so nothing is refused."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert rig.train(1)["frozen"] == []
    rig.model.requires_grad_(False)
    rig.model.inp.requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="kasmina.manager.slots"):
        reports = [rig.train(1) for _ in range(3)]
    assert [r["frozen"] for r in reports] == [[SEED0]] * 3
    assert manager.counters["frozen_seed_steps"] == 3
    warned = [r for r in caplog.records if "requires grad" in r.getMessage()]
    assert len(warned) == 1 and SEED0 in warned[0].getMessage()
    rig.model.requires_grad_(True)
    assert rig.train(1)["frozen"] == []
