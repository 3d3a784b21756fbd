"""A managed model converted in less usual ways mid-run: ``Module.type()``, ``to_empty`` onto the
device it is on, a promotion to ACTIVE before a step followed a cast, an epoch boundary while the
model is in float64. The host's step completes, nothing is charged or lost."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn import functional as F

from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.seeds.constants import CONSTANTS
from tests.manager.helpers import SEED0, Rig, S, make_config, record_activations, run_command


def _flags(rig: Rig) -> dict[str, torch.dtype]:
    slot = rig.model.out
    return {n: b.dtype for n, b in slot.named_buffers() if "flag" in n or "sat_out" in n}


def _step(rig: Rig, x: torch.Tensor) -> dict:
    loss = F.cross_entropy(rig.model(x).float(), rig.y)
    rig.manager.backward(loss, kd_loss=rig.manager.collect_kd_losses())
    return rig.manager.step()


def test_module_type_keeps_the_slots_flags_and_counts(rig: Rig, mlp) -> None:
    """``nn.Module.type(torch.float64)`` casts every buffer, bool and integer ones too: a slot's
    fault flags became float64 and every later ``step()`` raised reading them, for good (a cast
    back to float32 did not mend them). They keep their dtypes; the model trains on."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    dtypes = _flags(rig)
    for dtype in (torch.float64, torch.float32):
        rig.model.type(dtype)
        assert _flags(rig) == dtypes
        assert _step(rig, rig.x.to(dtype))["seeds_stepped"] == [SEED0]
    assert rig.manager.seed(SEED0).faults == 0


def test_to_empty_on_the_same_device_keeps_the_slots_constants(
    rig: Rig, mlp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``to_empty(device="cpu")`` then ``load_state_dict`` (the one ``to_empty`` a manager takes:
    the parameter objects stay) left the slot's constants, which no state dict holds, as
    uninitialised memory: the constants were refilled only after ``to_empty`` from ``meta``, and a
    healthy seed was charged "non-finite output". Here ``empty_like`` hands out poison."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    slot, seed = rig.model.out, rig.manager.seed(SEED0)
    before = {name: slot._buffers[name].clone() for name in CONSTANTS}
    alpha = seed.alpha.clone()
    saved = {k: v.clone() for k, v in rig.model.state_dict().items()}
    real_empty_like = torch.empty_like

    def poisoned(t: torch.Tensor, **kwargs) -> torch.Tensor:
        out = real_empty_like(t, **kwargs)
        return out.fill_(
            float("nan") if out.is_floating_point() else 7 if out.dtype != torch.bool else 0
        )

    with monkeypatch.context() as m:
        m.setattr(torch, "empty_like", poisoned)
        rig.model.to_empty(device="cpu")
    rig.model.load_state_dict(saved)
    for name, value in before.items():
        assert torch.equal(slot._buffers[name], value), name
    assert (
        torch.equal(seed.alpha, alpha)
        and seed.finite_flag.data_ptr() == slot._finite_flags[0].data_ptr()
    )
    report = rig.train(1)
    assert report["seeds_stepped"] == [SEED0] and not report["nonfinite"]
    assert seed.faults == 0


def test_a_promotion_right_after_a_cast_carries_the_seeds_moments(rig: Rig, mlp) -> None:
    """The controller's ADVANCE to ACTIVE applied at an epoch boundary right after the loop cast
    the model (``to(bfloat16)``), before any step: the seed's Adam moments, still float32, did not
    fit the host group and were dropped (logged at INFO only). They follow the cast first."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    for stage in (S.COMPATIBILITY_CHECK, S.GRAFTING):
        assert rig.send("advance", SEED0) and rig.stage(SEED0) == stage
        rig.train(1)
    rig.train(4)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.STABILIZATION
    rig.train(1)
    manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    params = list(manager.seed(SEED0).kernel.parameters())
    moments = {k for k, v in manager.optimizers.optimizer(SEED0).state[params[0]].items()}
    assert manager.handle_adaptation_command(
        rig.signed(make_seed_command("advance", SEED0, "", {}))
    )
    rig.model.to(torch.bfloat16)
    manager.end_epoch(1)  # the ADVANCE first
    assert rig.stage(SEED0) == S.ACTIVE
    state = manager.optimizers.optimizer("host").state[params[0]]
    assert set(state) == moments and state["exp_avg"].dtype == torch.bfloat16


def test_an_epoch_boundary_in_float64_writes_no_checkpoint(
    rig: Rig, mlp, caplog: pytest.LogCaptureFixture
) -> None:
    """``end_epoch`` while the model was in float64 (a gradient check) wrote a checkpoint no
    rollback could restore: in float64 the rebuilt optimizers refuse it, converted back the dtype
    check does, and it held a place in the rollback window. None is written (warned); the
    checkpoints either side restore."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    rig.model.double()
    _step(rig, rig.x.double())
    with caplog.at_level(logging.WARNING, logger="kasmina.manager.rollback"):
        manager.end_epoch(1)
    assert "epoch 1: no checkpoint written" in caplog.text
    rig.model.float()
    rig.train(1)
    manager.end_epoch(2)
    refused = rig.signed(make_rollback_command(1))
    assert not run_command(manager, refused)
    assert "no checkpoint of epoch 1" in str(manager.command_log[-1])
    for epoch in (2, 0):
        assert run_command(manager, rig.signed(make_rollback_command(epoch)))
    assert rig.stage(SEED0) == S.ISOLATED_INIT


def test_a_part_converted_without_a_slot_is_followed_on_request(
    tmp_path, store, keyring, mlp
) -> None:
    """A part of the model with no slot in it converted (a bf16 trunk): no slot sees it, so
    the step does not make the host optimizer's fp32 moments follow, and torch's Adam raises.
    ``manager.optimizers.follow_parameters()`` (the README's recipe) makes them follow."""

    class CastingHost(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = torch.nn.Linear(6, 8), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.inp(x.to(self.inp.weight.dtype)))
            return self.out(h.to(self.out.weight.dtype))

    rig = Rig(make_config(tmp_path / "first", store), keyring, record=False)
    rig.manager.close()
    rig.manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    rig.model = CastingHost()
    rig.manager.attach(rig.model, "out", 2, 2, host_lr=0.05, seed_lr=0.05)
    record_activations(rig.model, rig.x)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    rig.model.inp.to(torch.bfloat16)
    rig.manager.optimizers.follow_parameters()
    report = rig.train(1)
    assert report["host_stepped"] and report["seeds_stepped"] == [SEED0]
    state = rig.manager.optimizers.optimizer("host").state[rig.model.inp.weight]
    assert state["exp_avg"].dtype == torch.bfloat16
