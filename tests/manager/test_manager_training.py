"""KasminaKernelManager's training step end to end: hosts that step oddly (no-grad forwards, a
frozen host, slots no one input replays, a GradScaler that skips a step, NaN activations, changed
or new parameters, no backward) charge no seed and keep the host training; knowledge distillation
(a teacher, KD losses collected, leaked or hidden behind a checkpoint) and the debug gradient
monitors. A real Urza store, the real handler, a tiny host on CPU."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_optimizer_command, make_seed_command
from kasmina.kd.loss import StaticKDLoss
from kasmina.manager.manager import KasminaKernelManager
from kasmina.manager.slots import BAD_GRADIENT_STEPS
from kasmina.stages import StateColumn
from kasmina.urza.kernel import GPUKernel
from kasmina.utils.keyring import Keyring
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import (
    SEED0,
    SEED1,
    Host,
    Rig,
    S,
    assert_same,
    host_params,
    make_config,
    record_activations,
    run_command,
    through_a_seed,
    to_stabilization,
)


class _MaskedBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * mask


class _TwoSlotHost(nn.Module):
    """Slots on modules no one input replays: attention (query, key, value) and (x, mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
        self.blk = _MaskedBlock()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blk(self.enc(x), torch.ones_like(x)).mean(1))


def test_a_no_grad_forward_before_the_step_leaves_the_graph_check_its_output(rig: Rig, mlp) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    record = manager.require_registry()[SEED0]
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    trained = record.last_output
    assert trained is not None and trained.grad_fn is not None
    with torch.no_grad():  # e.g. logging a sample between the backward and the step
        rig.model(rig.x)
    assert record.last_output is trained
    manager.backward(loss)
    assert manager.step()["isolation_clean"] and record.last_output is None
    with torch.no_grad():  # a serving phase after training: no activation held for a check
        rig.model(rig.x)
    assert record.last_output is None


def test_a_frozen_host_takes_seeds_without_a_host_optimizer(tmp_path, store, keyring, mlp) -> None:
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = Host().requires_grad_(False)
    frozen = [(p, p.clone()) for p in model.parameters()]  # the objects the slot will hold
    with pytest.raises(ValueError, match="frozen host takes no host optimizer"):
        manager.attach(model, "out", 2, 2, host_lr=0.05)
    assert manager.registry is None and isinstance(model.out, nn.Linear)  # nothing attached
    manager.attach(model, "out", 2, 2, host_lr=None, seed_lr=0.05)
    assert not manager.optimizers.has_host
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    record_activations(model, x)  # GERMINATE checks the kernel on the slot's activations
    assert run_command(manager, sign_command(make_seed_command("germinate", SEED0, mlp),
                                             keyring, "ctl").SerializeToString())  # fmt: skip
    before = [p.detach().clone() for p in manager.seed(SEED0).seed_parameters()]
    for _ in range(3):
        manager.backward(None, kd_loss=F.cross_entropy(model(x), y))  # the seed alone learns
        assert manager.step()["seeds_stepped"] == [SEED0]
    after = manager.seed(SEED0).seed_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(torch.equal(p, before) for p, before in frozen)
    assert {id(p) for p, _ in frozen} <= {id(p) for p in model.parameters()}
    manager.end_epoch(0)
    manager.close()


@pytest.mark.parametrize("broken_replay", [False, True])
def test_end_epoch_never_fails_on_the_dormant_overhead_measurement(
    tmp_path, store, keyring, monkeypatch, broken_replay: bool
) -> None:
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = _TwoSlotHost()
    slots = manager.attach(model, ["self_attn", "blk"], 2, 4)
    x, y = torch.randn(4, 5, 8), torch.randint(0, 4, (4,))
    manager.backward(F.cross_entropy(model(x), y))
    manager.step()
    # Neither call is replayed from one tensor, so neither slot offers a sample to time.
    assert [slot.input_spec for slot in slots] == [None, None]
    if broken_replay:  # a slot that did record one, but whose replay raises: NaN, logged
        slots[1].input_spec = (torch.Size([4, 5, 8]), torch.float32, torch.device("cpu"))
    manager.end_epoch(0, {"val_accuracy": 0.5})
    assert math.isnan(manager.get_performance_metrics()["dormant_overhead_us"])
    manager.close()


def test_the_readme_grad_scaler_recipe_skips_an_overflowing_step_and_charges_no_seed(
    rig: Rig, mlp
) -> None:
    manager = rig.manager
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    reports, before = [], None
    for overflow in (False, True, False):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
        if overflow:  # what an fp16 backward that overflows produces
            loss = loss * math.inf
            before = [p.detach().clone() for p in rig.model.parameters()]
        manager.backward(scaler.scale(loss), kd_loss=None)
        for optimizer_id in manager.optimizers.optimizer_ids:
            scaler.unscale_(manager.optimizers.optimizer(optimizer_id))
        reports.append(manager.step(grad_clip_norm=1.0))
        scaler.update()
        if overflow:
            after = list(rig.model.parameters())
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
            assert scaler.get_scale() == 2.0**15
    assert [r["host_stepped"] for r in reports] == [True, False, True]
    assert [r["seeds_stepped"] for r in reports] == [[SEED0], [], [SEED0]]
    assert manager.seed(SEED0).faults == 0 and rig.stage(SEED0) is S.ISOLATED_INIT
    assert all(torch.isfinite(p).all() for p in rig.model.parameters())


def test_nan_activations_of_a_diverging_host_charge_no_seed_while_clipping_skips(
    rig: Rig, mlp
) -> None:
    """A batch whose activations at the slot are NaN (one bad sample) makes the seed's output
    NaN too: the seed, whose input was the NaN, falls back, skips the step and is charged
    nothing (three such batches quarantined it), with clipping or without, where the host
    alone steps on its NaN gradients and the seed's weights stay finite."""
    manager = rig.manager
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    bad = rig.x.clone()
    bad[0, 0] = math.nan
    reports = []
    for x in (rig.x, bad, bad, rig.x, bad, rig.x):
        manager.backward(F.cross_entropy(rig.model(x), rig.y))
        reports.append(manager.step(grad_clip_norm=1.0))
    assert [r["host_stepped"] for r in reports] == [True, False, False, True, False, True]
    assert [r["nonfinite"] for r in reports] == [[], [SEED0], [SEED0], [], [SEED0], []]
    assert [r["seeds_stepped"] for r in reports] == [[SEED0], [], [], [SEED0], [], [SEED0]]
    assert manager.seed(SEED0).faults == 0 and rig.stage(SEED0) is S.ISOLATED_INIT
    assert all(torch.isfinite(p).all() for p in rig.model.parameters())
    manager.backward(F.cross_entropy(rig.model(bad), rig.y))
    report = manager.step()  # no clipping: the host steps on NaN, the seed does not
    assert report["host_stepped"] and report["seeds_stepped"] == []
    assert manager.seed(SEED0).faults == 0
    assert all(torch.isfinite(p).all() for p in manager.seed(SEED0).seed_parameters())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("clip", [0.0, 1.0], ids=["unclipped", "clipped"])
def test_a_nan_target_after_a_stabilizing_seed_charges_it_nothing(
    rig: Rig, mlp, clip, compiled: bool
) -> None:
    """A NaN in the targets reaches the seed's output as a NaN gradient from above, the data's
    and not the seed's, while the host, which a STABILIZATION slot gives no gradient, stays
    finite. The seed loses those steps and is charged nothing. Unclipped, it stepped on the
    NaN, its output was then NaN on finite inputs, and three clean steps quarantined it;
    clipped, its run of non-finite norms "with the host's finite" did. Compiled too, where no
    guarded island runs the seed's backward."""
    manager = rig.manager
    if compiled:
        torch._dynamo.reset()
        rig.model = torch.compile(rig.model, backend="aot_eager")
    assert rig.send("germinate", SEED0, mlp)
    to_stabilization(rig, [SEED0])
    seed = manager.seed(SEED0)
    target = F.one_hot(rig.y, 4).float()
    bad = target.clone()
    bad[0, 0] = math.nan  # a feature of seed 0's chunk
    for _ in range(BAD_GRADIENT_STEPS + 2 if clip else 1):
        manager.backward(F.mse_loss(rig.model(rig.x), bad))
        report = manager.step(grad_clip_norm=clip)
        assert report["nonfinite"] == [SEED0] and report["seeds_stepped"] == []
    for _ in range(3):
        manager.backward(F.mse_loss(rig.model(rig.x), target))
        report = manager.step(grad_clip_norm=clip)
        assert report["nonfinite"] == [] and report["seeds_stepped"] == [SEED0]
    assert seed.faults == 0 and rig.stage(SEED0) is S.STABILIZATION
    assert all(torch.isfinite(p).all() for p in seed.seed_parameters())


def test_a_non_finite_validation_forward_is_charged_and_keeps_the_steps_gradients(
    rig: Rig, mlp
) -> None:
    """A forward under ``no_grad`` between the backward and the step (a validation batch) on
    which the seed's output is not finite: the seed falls back there and is charged one fault
    at the step, but that forward recorded no gradient, so the seed steps on the training
    forward's clean gradients."""
    manager = rig.manager
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    seed = manager.seed(SEED0)
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    weight = next(seed.kernel.parameters())
    kept = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(math.nan)  # the kernel's output overflows on this batch
        assert torch.isfinite(rig.model(rig.x)).all()  # the host stood in for it
        weight.copy_(kept)
    before = [p.detach().clone() for p in seed.seed_parameters()]
    assert all(p.grad is not None for p in seed.seed_parameters())
    report = manager.step()
    assert report["seeds_stepped"] == [SEED0] and report["nonfinite"] == []
    assert seed.faults == 1 and seed.nonfinite_events == 1 and list(seed.fault_log)
    after = [p.detach() for p in seed.seed_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(torch.isfinite(p).all() for p in after)


def test_the_readme_accumulation_recipe_runs_before_and_after_a_seed_computes_kd(
    kd_rig: Rig, mlp
) -> None:
    """``kd`` is None until a seed computes a KD loss: the recipe divided it by N and raised
    (TypeError) on the first step. Its micro-batches give the host the full batch's gradient."""
    rig, manager = kd_rig, kd_rig.manager
    n, teacher = 2, torch.randn(16, 4)
    params = manager.require_registry().host_params
    for germinate in (False, True):
        if germinate:
            assert rig.send("germinate", SEED0, mlp)
        full = torch.autograd.grad(F.cross_entropy(rig.model(rig.x), rig.y), params)
        assert manager.collect_kd_losses() is None  # no teacher set: none computed
        seen = []
        for x, y, t in zip(rig.x.chunk(n), rig.y.chunk(n), teacher.chunk(n), strict=True):
            manager.set_teacher_logits(t)
            loss = F.cross_entropy(rig.model(x), y)
            kd = manager.collect_kd_losses()
            seen.append(kd is not None)
            manager.backward(loss / n, kd_loss=None if kd is None else kd / n)
        for p, g in zip(params, full, strict=True):
            torch.testing.assert_close(p.grad, g)
        assert seen == [germinate] * n
        report = manager.step()
        assert report["host_stepped"] and report["seeds_stepped"] == ([SEED0] if germinate else [])


def test_teacher_predictions_kd_training_and_register_teacher(kd_rig: Rig, mlp) -> None:
    rig, manager = kd_rig, kd_rig.manager
    torch.manual_seed(3)
    teacher_net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    teacher = manager.load_teacher(teacher_net)
    logits = manager.get_teacher_predictions(rig.x)
    assert logits.shape == (16, 4) and logits.dtype == torch.float32 and not logits.requires_grad
    kernel, again = asyncio.run(manager.load_kernel_with_teacher(mlp))
    assert isinstance(kernel, GPUKernel) and torch.equal(again, logits)
    effect = manager.get_checkpoint_effectiveness()
    assert effect["param_bytes_reduced"] * 2 == effect["param_bytes_full"]
    register = make_optimizer_command("register_teacher")
    assert run_command(manager, rig.signed(register))
    count = sum(p.numel() for p in teacher.teacher_parameters())
    assert manager.optimizers.teacher_param_count == count
    with pytest.raises(TypeError):  # unsigned: it would be a door around the verifier
        asyncio.run(manager.handle_optimizer_command(register.optimizer_command))
    assert rig.send("germinate", SEED0, mlp)
    before = [p.detach().clone() for p in teacher.teacher_parameters()]
    rig.train(3, teacher=logits)
    assert manager.guard.violating_steps == 0 and rig.stage(SEED0) == S.ISOLATED_INIT
    assert all(torch.equal(a, p) for a, p in zip(before, teacher.teacher_parameters(), strict=True))


def test_a_skipped_batchs_kd_loss_is_reported_and_discarded_by_a_collect(
    kd_rig: Rig, mlp, caplog
) -> None:
    """A loop that skips a batch after its forward (a non-finite loss: ``continue``, no collect,
    no step) left that batch's KD loss in the slot, and the next batch's collect summed it in,
    silently: the seed trained on the rejected batch. Several views of one batch, each with its
    teacher, then one collect, are the same calls, so the loss is kept, but the next teacher
    logits now report it (counted, warned), and a collect discards it, as the README says."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    manager.set_teacher_logits(teacher)
    rig.model(rig.x)
    reference = manager.collect_kd_losses()
    manager.step()
    manager.set_teacher_logits(teacher * 10)
    rig.model(rig.x.flip(0))  # skipped: nothing collected, no step
    with caplog.at_level(logging.WARNING, logger="kasmina"):
        manager.set_teacher_logits(teacher)
    assert manager.counters["kd_uncollected"] == 1 and rig.slot.sat_out["kd_uncollected"] == 1
    assert any("collect it and discard it" in r.getMessage() for r in caplog.records)
    manager.set_teacher_logits(None)
    manager.collect_kd_losses()  # the skipped batch's, discarded
    manager.set_teacher_logits(teacher)
    rig.model(rig.x)
    assert torch.equal(reference, manager.collect_kd_losses())


def test_each_uncollected_kd_loss_is_counted_once(kd_rig: Rig, mlp) -> None:
    """Forwards with teacher logits and no collect (a validation loop reusing the training
    forward): each left loss is counted once, at the next teacher logits; the count grew with
    the square of the forwards (every call counted every loss still held again). A collect
    starts the count anew."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    for _ in range(6):
        manager.set_teacher_logits(teacher)
        rig.model(rig.x)
    manager.set_teacher_logits(teacher)
    assert manager.counters["kd_uncollected"] == 6
    manager.collect_kd_losses()
    rig.model(rig.x)
    manager.set_teacher_logits(teacher)
    assert manager.counters["kd_uncollected"] == 7
    manager.set_teacher_logits(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_leaking_seed_only_loss_is_caught_dropped_and_trips_the_breaker(
    kd_rig: Rig, mlp, tmp_path, dtype
) -> None:
    """In a model cast to float64 after GERMINATE too: the leak check refused its gradients'
    dtype, and the refusal escaped ``manager.backward``."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.model.to(dtype)
    x = rig.x = rig.x.to(dtype)
    host_weight = rig.model.inp.weight
    for step in range(3):
        rig.slot.set_teacher_logits(torch.randn(16, 4, dtype=dtype))
        loss = F.cross_entropy(rig.model(x), rig.y)
        kd = through_a_seed(manager.collect_kd_losses() + 1e-2 * host_weight.sum())  # a leak
        manager.backward(loss, kd_loss=kd)
        clean = torch.autograd.grad(F.cross_entropy(rig.model(x), rig.y), host_weight)[0]
        assert torch.equal(host_weight.grad, clean)  # the leaked gradient never reaches it
        report = manager.step()
        assert not report["isolation_clean"] and not report["host_stepped"]
        if step < 2:
            assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert rig.stage(SEED0) == S.QUARANTINE and manager.guard.breaker_trips == 1
    (emergency,) = (tmp_path / "emergency").glob("*.emergency_isolation_*.ckpt")
    assert manager.state.checkpoint_signer.read(emergency, kind="emergency")["seed_id"] == SEED0
    assert rig.train(1)["host_stepped"]  # the host keeps training
    assert rig.send("cull", SEED0) and rig.stage(SEED0) == S.COOLDOWN


def test_a_kd_loss_that_reaches_the_host_by_itself_is_refused_and_nothing_charged(
    kd_rig: Rig, mlp
) -> None:
    """A distillation loss on the model's own output passed as ``kd_loss`` (``StaticKDLoss``
    of the output): its backward gave the host a gradient, the step's leak check charged the
    seed for it (quarantined at the third step) and skipped the host's step every step, for
    good. ``manager.backward`` refuses it before anything changes; the collected KD loss,
    scaled as accumulation scales it, passes."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    teacher = torch.randn(16, 4)
    out = rig.model(rig.x)
    with pytest.raises(ValueError, match="kd_loss reaches the host's parameters"):
        manager.backward(F.cross_entropy(out, rig.y), kd_loss=StaticKDLoss(2.0)(out, teacher))
    assert all(p.grad is None for p in host_params(rig))
    assert all(p.grad is None for p in manager.seed(SEED0).seed_parameters())
    report = manager.step()
    assert report["isolation_clean"] and manager.seed(SEED0).isolation_violations == 0
    for _ in range(2):
        rig.slot.set_teacher_logits(teacher)
        loss = F.cross_entropy(rig.model(rig.x), rig.y)
        manager.backward(loss, kd_loss=manager.collect_kd_losses() / 2)
        report = manager.step()
        assert report["isolation_clean"] and report["host_stepped"]
        assert report["seeds_stepped"] == [SEED0]


def test_a_kd_loss_that_hides_the_host_behind_a_reentrant_checkpoint_charges_no_seed(
    kd_rig: Rig, mlp
) -> None:
    """A reentrant activation checkpoint records one node whose inputs are not the parameters
    inside it, so the walk cannot see a misplaced loss reach them (a PEFT model with reentrant
    gradient checkpointing: every trainable host parameter is inside). The loss holds none of
    the collected KD losses: its leak is the caller's, dropped without charging the seed or
    skipping the host's step (the seed was charged and, at the third, quarantined)."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    model, teacher = rig.model, torch.randn(16, 4)
    # Debug monitors too: their seed-only phase is a seed's loss's (they charged the seed).
    manager.register_gradient_monitors(model.inp, manager.seed(SEED0))

    def body(h: torch.Tensor) -> torch.Tensor:
        return model.out(torch.relu(model.inp(h)))

    for step in range(3):
        x = rig.x.clone().requires_grad_(True)  # as enable_input_require_grads makes it
        out = checkpoint(body, x, use_reentrant=True)
        manager.backward(F.cross_entropy(out, rig.y), kd_loss=StaticKDLoss(2.0)(out, teacher))
        report = manager.step()
        assert report["isolation_clean"] and report["host_stepped"]
        assert manager.counters["kd_loss_reached_host"] == step + 1
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.seed(SEED0).isolation_violations == 0


def test_debug_gradient_monitors_report_a_leak(kd_rig: Rig, mlp) -> None:
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    manager.register_gradient_monitors(rig.model.inp, manager.seed(SEED0).kernel)
    assert manager.check_gradient_isolation()
    rig.slot.set_teacher_logits(torch.randn(16, 4))
    rig.model(rig.x)
    manager.backward(
        None, kd_loss=through_a_seed(manager.collect_kd_losses() + rig.model.inp.bias.sum())
    )
    assert not manager.check_gradient_isolation()
    assert manager.guard.external[0].violation_count == 1  # its hook on inp.bias saw the leak
    assert manager.require_registry().table.read_row(0)[StateColumn.LIFECYCLE_STAGE.name] == 1


def test_a_debug_pair_that_is_not_two_modules_is_refused_naming_the_argument(rig: Rig) -> None:
    """``register_gradient_monitors(None, None)`` took None for the kernel of a seed without
    one, dropped that seed's monitor and its hooks, then raised AttributeError from inside;
    a non-module for a pair of no seed used up a name (``external[n]``) and raised about a
    weak reference. Each side is checked first: a TypeError naming it, nothing changed."""
    manager, inp = rig.manager, rig.model.inp
    manager.register_gradient_monitors(inp, manager.seed(SEED1))  # DORMANT: no kernel
    hooks = len(inp.weight._backward_hooks)
    for host, seed, name in [(None, None, "host"), (inp, None, "seed"), (3, inp, "host")]:
        with pytest.raises(TypeError, match=f"{name}_model must be an nn.Module, got"):
            manager.register_gradient_monitors(host, seed)
    assert [m.seed_id for m in manager.guard.external] == [SEED1]
    assert len(inp.weight._backward_hooks) == hooks
    other = nn.Linear(2, 2)
    manager.register_gradient_monitors(inp, other)
    assert [m.seed_id for m in manager.guard.external] == [SEED1, "external[0]"]


def test_a_seed_registered_again_runs_one_debug_monitor(rig: Rig, mlp) -> None:
    """Registered once per germination of a seed id (cull, then germinate anew): the new
    monitor replaces the old one and its hooks, which would otherwise pile up on every step
    and keep every released kernel alive. A pair of no seed id keeps its name while its
    modules live; once one is gone, its monitor goes too (it piled up as the seed's did)."""
    manager = rig.manager
    kept = nn.Linear(2, 2)  # no seed of ours, alive all along: one monitor, ``external[0]``
    for cycle in range(3):
        gc.collect()  # the last cycle's released program module (graph modules hold cycles)
        assert rig.send("germinate", SEED0, mlp)
        manager.register_gradient_monitors(rig.model.inp, manager.seed(SEED0).kernel)
        manager.register_gradient_monitors(rig.model.inp, kept)
        # The kernel's program module is no seed id either; it goes with the CULL below.
        manager.register_gradient_monitors(rig.model.inp, manager.seed(SEED0).kernel.inner)
        ids = sorted(m.seed_id for m in manager.guard.external)
        assert ids == ["external[0]", f"external[{cycle + 1}]", SEED0]
        assert len(rig.model.inp.weight._backward_hooks) == 3
        rig.train(1)
        assert rig.send("cull", SEED0)
        manager.end_epoch(2 * cycle)  # the embargo passes
        manager.end_epoch(2 * cycle + 1)
    gc.collect()
    rig.train(1)  # a step forgets the monitors of pairs whose modules are gone, hooks and all
    assert sorted(m.seed_id for m in manager.guard.external) == ["external[0]", SEED0]
    assert len(rig.model.inp.weight._backward_hooks) == 2


def test_debug_monitors_keep_accumulated_host_gradients_and_go_inert_once_tripped(
    rig: Rig,
) -> None:
    """A seed-only loss under a debug monitor leaves the host's accumulated gradients as they
    were (two micro-batches sum, no false leak); once a monitor trips, it has had its say and
    the host steps again on clean steps."""
    manager, model = rig.manager, rig.model
    student = nn.Linear(6, 3)  # seed-side, disjoint from the host
    manager.register_gradient_monitors(model.inp, student)
    xs = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ys = [torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])]
    for x, y in zip(xs, ys, strict=True):
        F.cross_entropy(model(x), y).backward()
    want = model.inp.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    for x, y in zip(xs, ys, strict=True):
        manager.backward(F.cross_entropy(model(x), y), kd_loss=student(x).pow(2).mean())
    torch.testing.assert_close(model.inp.weight.grad, want)
    assert manager.check_gradient_isolation()
    model.zero_grad(set_to_none=True)
    for _ in range(manager.config.max_isolation_violations):  # a leaking seed loss trips it
        leak = through_a_seed(student(xs[0]).sum() + model.inp.bias.sum())
        manager.backward(F.cross_entropy(model(xs[0]), ys[0]), kd_loss=leak)
        assert not manager.step()["host_stepped"]
    assert manager.guard.external[0].tripped
    for _ in range(2):
        before = model.inp.weight.detach().clone()
        manager.backward(F.cross_entropy(model(xs[0]), ys[0]))
        report = manager.step()
        assert report["isolation_clean"] and report["host_stepped"]
        assert not torch.equal(before, model.inp.weight)


def test_a_debug_monitor_over_the_whole_grown_model_leaves_the_seeds_kd_gradient(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """``register_gradient_monitors(model, seed)``, the natural call, put the seeds' kernels on
    the host side (a grown model holds them): the seed-only KD phase set their gradients aside
    as a host leak and put back None, every step was unclean, and a healthy seed went to
    QUARANTINE. The host side is the host's own parameters; a real host leak still trips it."""
    rig = Rig(make_config(tmp_path, store, kd_enabled=True), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    seed = manager.seed(SEED0)
    manager.register_gradient_monitors(rig.model, seed)
    (monitor,) = manager.guard.external
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(3))
    for _ in range(manager.config.max_isolation_violations + 1):
        rig.model.zero_grad(set_to_none=True)
        manager.set_teacher_logits(teacher)
        rig.model(rig.x)
        manager.backward(None, kd_loss=manager.collect_kd_losses())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seed.kernel.parameters())
        report = manager.step()
        assert report["isolation_clean"] and not monitor.violations
    assert rig.stage(SEED0) == S.ISOLATED_INIT and seed.isolation_violations == 0
    rig.model.zero_grad(set_to_none=True)
    manager.backward(None, kd_loss=through_a_seed(rig.model.inp.bias.sum()))
    assert not manager.step()["isolation_clean"] and monitor.violations
    manager.close()


def test_a_kd_head_routes_vocabulary_logits_to_the_slot_it_reads(kd_rig: Rig, mlp) -> None:
    """``set_kd_head`` gives a head to the slots as wide as its input; teacher logits as wide
    as its vocabulary then reach those slots, whose seeds distil through the head (fused)
    while the head and the host stay untouched by the KD loss."""
    rig, manager = kd_rig, kd_rig.manager
    torch.manual_seed(11)
    head = nn.Linear(4, 9)  # the slot "out" is 2 seeds x 2 = 4 wide
    assert manager.set_kd_head(head.weight, head.bias) == [rig.slot.layer_id]
    assert rig.slot.kd_width == 9
    assert rig.send("germinate", SEED0, mlp)
    teacher = torch.randn(16, 9)
    manager.set_teacher_logits(teacher)
    rig.model(rig.x)
    kd = manager.collect_kd_losses()
    assert kd is not None and torch.isfinite(kd)
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y), kd_loss=kd)
    assert all(p.grad is not None for p in manager.seed(SEED0).kernel.parameters())
    assert head.weight.grad is None
    assert manager.step()["isolation_clean"]
    manager.set_teacher_logits(torch.randn(16, 4))  # the slot's own width: not for it now
    rig.model(rig.x)
    assert manager.collect_kd_losses() is None


@pytest.mark.parametrize("how", ["to-meta", "load-assign"])
def test_a_step_refuses_a_model_whose_parameters_were_replaced(rig: Rig, mlp, how: str) -> None:
    """After attach, a move to another kind of device (meta tensors are another tensor type,
    so ``.to`` makes new parameters) or ``load_state_dict(assign=True)`` leaves the manager's
    optimizers holding the old parameters: ``step()`` says so before it changes anything,
    where it would have stepped tensors the model no longer uses."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    registered = list(manager.require_registry().host_params)
    saved = clone_state(manager.optimizers.state_dict())
    weights = [p.detach().clone() for p in registered]
    if how == "to-meta":
        rig.model.to("meta")
    else:
        rig.model.load_state_dict(clone_state(rig.model.state_dict()), assign=True)
    assert not any(p is q for p, q in zip(rig.model.parameters(), registered, strict=False))
    step_before = manager.state.global_step
    with pytest.raises(RuntimeError, match="replaced after the manager registered them"):
        manager.step()
    assert manager.state.global_step == step_before
    assert_same(saved, clone_state(manager.optimizers.state_dict()))
    assert all(torch.equal(p, w) for p, w in zip(registered, weights, strict=True))


@pytest.mark.parametrize("how", ["spectral_norm", "orthogonal", "prune"])
def test_a_parametrization_added_after_attach_keeps_the_host_training(rig: Rig, how: str) -> None:
    """``spectral_norm``/``orthogonal`` on a host layer after attach move the very parameter
    object under ``parametrizations.weight.original``, and pruning renames it ``weight_orig``:
    the optimizers still hold it, so every step goes on training it (the held-parameter check
    looked only under the original name: each step was refused as "parameters replaced")."""
    original = rig.model.inp.weight
    if how == "prune":
        torch.nn.utils.prune.l1_unstructured(rig.model.inp, "weight", amount=0.25)
        assert rig.model.inp.weight_orig is original
    else:
        getattr(torch.nn.utils.parametrizations, how)(rig.model.inp)
        assert rig.model.inp.parametrizations.weight.original is original
    before = original.detach().clone()
    rig.train(2)
    assert not torch.equal(original, before)  # the host trained through the parametrization


def test_a_parametrization_that_splits_a_parameter_is_refused_by_step(rig: Rig) -> None:
    """``weight_norm`` replaces the weight by two new parameters: the optimizers would step
    the old tensor while the model trains nothing, so ``step()`` says so."""
    torch.nn.utils.parametrizations.weight_norm(rig.model.inp)
    loss = rig.model(rig.x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="replaced after the manager registered them"):
        rig.manager.step()


@pytest.mark.parametrize(
    "change", ["weight_norm on a later layer", "a layer replaced", "one layer loaded by assign"]
)
def test_new_trainable_parameters_no_optimizer_steps_are_refused_by_step(
    rig: Rig, mlp, change: str
) -> None:
    """Changes to a layer other than the model's first: ``step()`` checked only the first
    parameter, so it went on while the new parameters never trained. A layer added to the host
    optimizer (``add_param_group``) trains, and is not refused."""
    model, manager = rig.model, rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    if change == "weight_norm on a later layer":
        torch.nn.utils.parametrizations.weight_norm(model.out.host)
        new = [f"out.host.parametrizations.weight.original{i}" for i in (0, 1)]
    elif change == "a layer replaced":
        model.inp = torch.nn.Linear(6, 8)
        new = ["inp.weight", "inp.bias"]
    else:
        weight = torch.nn.Parameter(torch.zeros(4, 8))
        model.out.host.load_state_dict({"weight": weight}, strict=False, assign=True)
        new = ["out.host.weight"]
    loss = torch.nn.functional.cross_entropy(model(rig.x), rig.y)
    manager.backward(loss)
    step = manager.global_step
    with pytest.raises(RuntimeError, match=re.escape(str(new)[:-1])):
        manager.step()
    assert manager.global_step == step
    if change == "weight_norm on a later layer":
        # Its ``original1`` is the old weight's memory, which the host group holds: no group
        # may add it, and the step says so.
        with pytest.raises(RuntimeError, match="original1'] share the memory"):
            manager.step()
        return
    added = [p for n, p in model.named_parameters() if n in new]
    manager.optimizers.optimizer("host").add_param_group({"params": added})
    before = [p.detach().clone() for p in added]
    rig.train(2)
    assert all(not torch.equal(a, p) for a, p in zip(before, added, strict=True))


def test_a_trainer_stepping_the_host_itself_may_change_its_layers(tmp_path, store, keyring) -> None:
    """``attach(host_lr=None)``: the trainer's own optimizer steps the host, so a layer it
    replaces (and gives its optimizer) is its business; the check of new trainable parameters
    refused the step, telling it to use a host optimizer that does not exist."""
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = Host()
    manager.attach(model, "out", 2, 2, host_lr=None)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    model.inp = torch.nn.Linear(6, 8)
    own = torch.optim.SGD([p for n, p in model.named_parameters() if ".seeds." not in n], lr=0.1)
    before = model.inp.weight.detach().clone()
    manager.backward(torch.nn.functional.cross_entropy(model(x), y))
    own.step()
    manager.step()
    assert not torch.equal(before, model.inp.weight)


def test_a_step_without_a_backward_reports_no_seed_stepped(rig: Rig, mlp) -> None:
    """``step()`` after a forward without ``backward`` (an evaluation batch, a skipped loss)
    reported every training seed in ``seeds_stepped``, though their optimizers had nothing to
    apply: the controller read a step that changed nothing as one that trained them."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.model(rig.x)
    before = [p.detach().clone() for p in manager.seed(SEED0).seed_parameters()]
    report = manager.step()
    assert report["seeds_stepped"] == []
    after = manager.seed(SEED0).seed_parameters()
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert rig.train(1)["seeds_stepped"] == [SEED0]


def test_a_seed_quarantined_in_a_forward_keeps_no_graph_of_it(rig: Rig, mlp) -> None:
    """The kernel's output a forward records for the step's isolation check (its graph and
    the island's saved activations with it) was cleared by that check, which skips a seed no
    longer isolated: one quarantined by a fault in the forward held a micro-batch's
    activations for as long as it stayed in QUARANTINE. The quarantine lets go of them."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    record = manager.require_registry()[SEED0]
    inner = record.kernel.inner
    forward = inner.forward
    inner.forward = lambda x: forward(x)[..., :1]  # the wrong shape: a fault at each forward
    for _ in range(record.seed.fault_limit):
        rig.train(1)
    assert rig.stage(SEED0) == S.QUARANTINE
    rig.train(2)
    assert record.last_output is None and not record.input_grad
