"""What a user may do to a managed model between steps, and what the manager then says:
``kasmina.detach`` (refused by ``step()``), ``requires_grad_(False)`` on the seeds (warned
and counted), and ``close()`` (a closed manager refuses everything, and never opens its
checkpoint store or takes its run's lock again)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

import kasmina
from kasmina.control.builders import (
    make_optimizer_command,
    make_rollback_command,
    make_seed_command,
)
from kasmina.control.commands import to_kasmina_command
from kasmina.manager.ddp import DistributedKasmina
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, S, host_params, make_config


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


def test_a_step_refuses_a_model_whose_slot_was_replaced_by_hand(rig: Rig, mlp) -> None:
    """``model.out = model.out.host`` takes the slot out as ``detach`` does, without its flag:
    ``step()`` went on, listing seeds that no longer ran as stepped. A wrapped slot is kept."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    slot = rig.model.out
    rig.model.out = torch.nn.Sequential(slot)  # wrapped: still in the model, still trains
    assert rig.train(1)["seeds_stepped"] == [SEED0]
    rig.model.out = slot.host
    before, step = host_params(rig), manager.state.global_step
    with pytest.raises(RuntimeError, match=r"\['out'\] were taken out of the model"):
        manager.step()
    assert manager.state.global_step == step
    assert all(torch.equal(a, b) for a, b in zip(before, host_params(rig), strict=True))


@pytest.mark.parametrize("how", ["del", "modules", "pop"])
def test_a_step_refuses_a_model_whose_slot_was_deleted(rig: Rig, mlp, how: str) -> None:
    """A slot deleted from the model (``del model.out``, a write to ``_modules``, or the
    container holding it popped) fires no registration hook: the paths to the slots are looked
    at every step. A slot moved elsewhere in the model still trains under its new path."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    model, slot = rig.model, rig.model.out
    model._modules["holder"] = torch.nn.ModuleList([slot])  # moved, no hook fired
    del model._modules["out"]
    model.forward = lambda x: model.holder[0](torch.relu(model.inp(x)))  # type: ignore
    assert rig.train(1)["seeds_stepped"] == [SEED0]
    if how == "del":
        del model.holder
    elif how == "modules":
        model._modules["holder"] = slot.host  # no hook fires
    else:
        model.holder.pop(0)
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


def _trainer(tmp_path: Path, store: Path, keyring: Keyring) -> Rig:
    """A trainer of the run ``again`` (its default nonce ledger, the shared checkpoint
    directory): a trainer restarted in this process is another one."""
    return Rig(make_config(tmp_path, store, run_id="again"), keyring)


@pytest.mark.parametrize("action", ["checkpoints", "rollback", "cull", "germinate", "ddp"])
def test_a_closed_manager_refuses_and_never_takes_its_run_lock_again(
    tmp_path: Path, store: Path, keyring: Keyring, mlp, action: str
) -> None:
    """Closed before its first epoch ended (no checkpoint store opened yet), a manager refuses
    its checkpoints, ``execute`` (even a ROLLBACK that would be refused) and joining a
    distributed run with ``RuntimeError``, before anything changes. It opens no store, so the
    run's lock stays free: the same run restarted in this process writes its checkpoint while
    the closed manager is still alive."""
    closed = _trainer(tmp_path, store, keyring)
    manager = closed.manager
    assert closed.send("germinate", SEED0, mlp)
    closed.train(2)
    manager.close()
    stages, log, step = manager.stages(), list(manager.command_log), manager.global_step
    commands = {
        "rollback": make_rollback_command(0),  # no checkpoint of epoch 0: refused if it ran
        "cull": make_seed_command("cull", SEED0),
        "germinate": make_seed_command("germinate", SEED1, mlp),
    }
    with pytest.raises(RuntimeError, match="this manager is closed"):
        if action == "checkpoints":
            manager.checkpoints.epochs()
        elif action == "ddp":
            DistributedKasmina(manager)
        else:
            manager.execute(to_kasmina_command(commands[action]))
    assert manager.state._checkpoints is None  # no store opened, no lock taken
    assert manager.command_relay is None and manager.grad_sync is None
    assert (manager.stages(), list(manager.command_log)) == (stages, log)
    assert manager.global_step == step
    restarted = _trainer(tmp_path, store, keyring)
    restarted.train(1)
    restarted.manager.end_epoch(0)  # the run's lock is free: its checkpoint is written
    assert restarted.manager.checkpoints.epochs() == [0]
    assert closed.manager is manager  # alive throughout: nothing released the lock for it
    restarted.manager.close()


def test_a_command_sent_to_a_closed_manager_is_refused_as_closed(rig: Rig) -> None:
    """The door of a closed manager refuses every command with the reason ``closed`` (not as
    a nonce-ledger failure, though its ledger is closed too), and nothing is queued."""
    manager = rig.manager
    manager.close()
    assert not manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
    stats = manager.handler.stats
    assert stats["rejected"] == stats["rejected:closed"] == 1
    assert stats["accepted"] == 0 and len(manager.pending) == 0


@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("owner", ["manager", "user"])
def test_a_model_converted_mid_run_trains_on_in_its_new_dtype(
    tmp_path: Path, store: Path, keyring: Keyring, mlp, dtype: torch.dtype, owner: str, clip
) -> None:
    """``model.to(bfloat16)`` after a seed trained: the optimizers the manager owns kept their
    moments in float32 and every ``step()`` raised from the seed's Adam (no fault charged, the
    step's graph never closed, so a controller's CULL was accepted and never applied). Their
    state now follows the parameters, as torch's ``load_state_dict`` casts a loaded one. With
    clipping, a float64 model's step raised too (the fused norms read no float64)."""
    options = {} if owner == "manager" else {"host_lr": None}
    rig = Rig(make_config(tmp_path, store), keyring, **options)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    rig.model.to(dtype)
    mine = None
    if owner == "user":  # the README's own optimizer, built over the host's parameters anew
        mine = torch.optim.SGD(manager.require_registry().host_params, lr=0.05)
    x = rig.x.to(dtype)
    seed = manager.seed(SEED0)
    before = [p.detach().clone() for p in seed.kernel.parameters()]
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(rig.model(x).float(), rig.y)
        manager.backward(loss, kd_loss=manager.collect_kd_losses())
        report = manager.step(grad_clip_norm=clip)
        if mine is not None:
            mine.step()
            mine.zero_grad()
        assert report["seeds_stepped"] == [SEED0]
    assert report["host_stepped"] == (owner == "manager")
    after = list(seed.kernel.parameters())
    assert all(p.dtype == dtype for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    state = manager.optimizers.optimizer(SEED0).state
    assert all(s["exp_avg"].dtype == dtype for s in state.values())
    assert rig.send("cull", SEED0) and rig.stage(SEED0) != S.ISOLATED_INIT


def test_a_seed_optimizer_that_raises_leaves_the_hosts_step_whole(rig: Rig, mlp) -> None:
    """A seed's optimizer that raises (here a state of another shape) made ``step()`` raise
    after the host's optimizer had stepped: host gradients never zeroed, commands never
    applied. Its seed now skips the step, its optimizer's state (stepped part-way) is reset,
    and the seed is charged a fault; the rest of the step completes."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    state = manager.optimizers.optimizer(SEED0).state
    for s in state.values():
        s["exp_avg"] = torch.zeros(3)  # not its parameter's shape
    report = rig.train(1)
    assert report["seeds_stepped"] == [] and report["host_stepped"]
    assert all(p.grad is None or not p.grad.any() for p in host_params(rig))
    count, reason = manager.optimizers.failed_steps[SEED0]
    assert count == 1 and "RuntimeError" in reason
    assert not state  # what it stepped part-way is no state of any step: reset
    seed = manager.seed(SEED0)
    assert seed.faults == 1 and seed.fault_log[-1].startswith("RuntimeError")
    assert rig.train(1)["seeds_stepped"] == [SEED0]  # from a fresh state
    assert rig.send("cull", SEED0)  # the safe point still applies commands


def test_a_step_command_whose_seed_optimizer_raises_charges_the_seed_a_fault(rig: Rig, mlp):
    """A controller's STEP carried out by ``manager.execute`` while the seed holds gradients
    (a caller's own safe point) reached the same raising optimizer: the command was refused and
    the optimizer reset, but the seed was charged no fault, so one that raised at every STEP
    never reached its fault limit. It is charged one, once (the next ``step()`` adds none)."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    for s in manager.optimizers.optimizer(SEED0).state.values():
        s["exp_avg"] = torch.zeros(3)  # not its parameter's shape
    torch.nn.functional.cross_entropy(rig.model(rig.x), rig.y).backward()
    command = make_optimizer_command("step", SEED0, learning_rate=0.01)
    assert not manager.execute(to_kasmina_command(command))
    assert "step skipped" in manager.command_log[-1][3]
    seed = manager.seed(SEED0)
    assert manager.optimizers.failed_steps[SEED0][0] == 1
    assert seed.faults == 1 and seed.fault_log[-1].startswith("RuntimeError")
    manager.step()
    assert seed.faults == 1


@pytest.mark.parametrize("strict", [True, False], ids=["whole", "floats-only"])
def test_loading_averaged_weights_keeps_the_blend_at_the_lifecycles_alpha(
    rig: Rig, mlp, strict: bool
) -> None:
    """An EMA of a grafting model (timm's recipe: ``lerp_`` of every float tensor of the
    ``state_dict``) averages the seed's ``alpha`` buffer too, which its extra state does not
    follow. Loading that back (whole, or its float tensors alone with ``strict=False``) left
    the blend reading the averaged alpha while the seed, the state table and G4 held the
    lifecycle's: the model blended at one alpha and reported another. The buffer loads as the
    lifecycle's alpha now, and the model computes what it did before the load."""
    manager = rig.manager
    _to_grafting(rig, mlp)
    rig.train(2)
    seed = manager.seed(SEED0)
    alpha = seed.alpha_value
    assert 0.0 < alpha < 0.9
    averaged = rig.model.state_dict()
    averaged["out.seeds.0.alpha"] = torch.tensor(0.9)  # an EMA's lerp of the buffer
    if not strict:
        averaged = {k: v for k, v in averaged.items() if v.is_floating_point()}
    rig.model.eval()
    with torch.no_grad():
        before = rig.model(rig.x)
        rig.model.load_state_dict(averaged, strict=strict)
        after = rig.model(rig.x)
    assert float(seed.alpha) == pytest.approx(alpha) and seed.alpha_value == alpha
    assert torch.equal(before, after)
    manager.close()


def test_a_load_without_the_alpha_buffer_or_in_half_precision_keeps_the_lifecycles_alpha(
    rig: Rig, mlp
) -> None:
    """A lenient load with the seed's extra state and without its ``alpha`` buffer set the
    seed's alpha and left the buffer the blend reads as it was; a bf16 state (an EMA kept in
    bf16) rounded the lifecycle's alpha into the buffer, and with ``assign=True`` made the
    buffer bf16 for good. The buffer is the extra state's alpha, in float32, each way."""
    manager = rig.manager
    _to_grafting(rig, mlp)
    rig.train(1)
    seed = manager.seed(SEED0)
    saved = rig.model.state_dict()
    alpha = seed.alpha_value
    rig.train(1)
    assert seed.alpha_value != alpha
    rig.model.load_state_dict({k: v for k, v in saved.items() if k != "out.seeds.0.alpha"}, False)
    assert seed.alpha_value == alpha and float(seed.alpha) == pytest.approx(alpha, abs=1e-7)
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in saved.items()}
    given = half["out.seeds.0.alpha"].clone()
    for assign in (False, True):
        rig.model.load_state_dict(half, assign=assign)
        assert seed.alpha.dtype == torch.float32
        assert float(seed.alpha) == torch.tensor(alpha, dtype=torch.float32).item()
        assert torch.equal(half["out.seeds.0.alpha"], given)  # the caller's tensor: not written
    bare = {k: v for k, v in half.items() if not k.endswith("_extra_state")}
    torch.set_default_dtype(torch.bfloat16)  # model code that sets it: alpha stays float32
    try:
        rig.model.load_state_dict(bare, strict=False, assign=True)
    finally:
        torch.set_default_dtype(torch.float32)
    own = torch.tensor(seed.alpha_value, dtype=torch.float32).item()  # the seed's own alpha
    assert seed.alpha.dtype == torch.float32 and float(seed.alpha) == own
    manager.close()


@pytest.mark.parametrize("fault", ["raise", "nan", "forward", "shape"])
def test_a_seed_faulted_in_one_micro_batch_loses_the_whole_step(rig: Rig, mlp, fault: str):
    """Gradient accumulation over two micro-batches, the GRAFTING seed's kernel faulting on the
    second: a non-finite output dropped the step's gradient and left alpha where it was, but a
    backward that raised, a forward that raised or an output of the wrong shape kept the first
    micro-batch's gradient, stepped the seed on it and advanced alpha (G4 came sooner than the
    schedule). Each fault now costs the seed the whole step, charged once; the host steps."""
    from tests.seeds.fault_helpers import _ExplodingBackward

    manager = rig.manager
    _to_grafting(rig, mlp)
    seed = manager.seed(SEED0)
    forward, calls = seed.kernel.forward, [0]

    def faulting(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        out = forward(x)
        if calls[0] != 2:
            return out
        if fault == "forward":
            raise RuntimeError("kernel forward exploded")
        if fault == "shape":
            return out[..., :1]
        return _ExplodingBackward.apply(out) if fault == "raise" else out * float("nan")

    seed.kernel.forward = faulting
    before = [p.detach().clone() for p in seed.seed_parameters()]
    graft_step, host = seed.graft_step, [p.detach().clone() for p in host_params(rig)]
    for half in (slice(0, 8), slice(8, 16)):
        loss = torch.nn.functional.cross_entropy(rig.model(rig.x[half]), rig.y[half]) / 2
        manager.backward(loss)
    report = manager.step()
    assert seed.faults == 1 and report["seeds_stepped"] == [] and report["host_stepped"]
    assert seed.graft_step == graft_step
    assert all(torch.equal(a, b) for a, b in zip(before, seed.seed_parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(host, host_params(rig), strict=True))
    manager.close()


def _to_grafting(rig: Rig, mlp: str) -> None:
    """SEED0 germinated, trained an epoch and advanced to GRAFTING by signed commands."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0)
    rig.train(1)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING


def test_under_anomaly_mode_a_non_finite_output_costs_one_fault_a_step(rig: Rig, mlp) -> None:
    """Anomaly mode finds a seed's non-finite output on the host (its NaN check would raise
    in the backward): that fault was charged at every forward, so three accumulated
    micro-batches quarantined a seed in one step, where without anomaly mode it is charged
    once a step, and the step report did not name it. It is settled at the step as without
    anomaly mode: one fault, its gradient dropped, the step skipped, reported."""
    manager = rig.manager
    _to_grafting(rig, mlp)
    seed = manager.seed(SEED0)
    with torch.no_grad():
        for p in seed.kernel.parameters():
            if p.dim() > 1:
                p.fill_(3e38)  # its output overflows
    with torch.autograd.detect_anomaly():
        for half in (slice(0, 6), slice(6, 11), slice(11, 16)):
            loss = torch.nn.functional.cross_entropy(rig.model(rig.x[half]), rig.y[half])
            manager.backward(loss / 3)
    report = manager.step()
    assert seed.faults == 1 and rig.stage(SEED0) == S.GRAFTING
    assert report["nonfinite"] == [SEED0] and report["seeds_stepped"] == []
    assert report["host_stepped"]
    manager.close()
