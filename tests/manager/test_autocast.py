"""A training loop that keeps every forward under ``torch.autocast``: what Kasmina records and
replays by itself (G3's probe, the dormant-overhead sample, GERMINATE's dry run) runs outside
autocast, so it must be in the dtype the host computes in there, never autocast's."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.seeds.compiled_cut import CUT_REASON
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config, run_command, walk_to_active


def _train_under_autocast(rig: Rig, steps: int) -> None:
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
        rig.manager.backward(loss, kd_loss=None)
        rig.manager.step()


def test_g3_probes_a_seed_in_the_hosts_dtype_not_autocasts(tmp_path, store, keyring, mlp) -> None:
    """The kernel's input was last seen in bf16 (autocast's); G3's probe, outside autocast, fed
    it that to an fp32 kernel, which raised: the seed was charged a fault per ADVANCE, and a
    controller retrying quarantined a healthy seed."""
    rig = Rig(make_config(tmp_path, store), keyring, record=False)
    _train_under_autocast(rig, 2)
    assert rig.send("germinate", SEED0, mlp)
    _train_under_autocast(rig, 2)
    rig.manager.end_epoch(0)
    assert rig.send("advance", SEED0)  # G2: to COMPATIBILITY_CHECK
    assert rig.manager.require_registry()[SEED0].last_input[1] == torch.bfloat16
    assert rig.send("advance", SEED0)  # G3 on its own probe: no forward since
    assert rig.stage(SEED0) is S.GRAFTING and rig.manager.seed(SEED0).faults == 0


def test_the_dormant_overhead_is_measured_after_autocast_forwards(tmp_path, store, keyring) -> None:
    """The slot's input was recorded in bf16 and replayed outside autocast into the fp32
    host: the measurement raised, and the figure stayed NaN for the whole run."""
    rig = Rig(make_config(tmp_path, store), keyring, record=False)
    _train_under_autocast(rig, 2)
    assert rig.model.out.input_spec[1] == torch.float32
    assert math.isfinite(rig.manager.get_performance_metrics()["dormant_overhead_us"])
    rig.manager.close()


class ActHost(nn.Module):
    """A slot on a module without parameters (an activation)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 4)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.inp(x))


def test_a_slot_on_a_module_without_parameters_records_outside_autocast(
    tmp_path, store, keyring, mlp
) -> None:
    """Every forward under autocast leaves such a slot unrecorded (its module has no dtype of
    its own); GERMINATE's refusal said it had run no forward, and named no way out."""
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    model = ActHost()
    manager.attach(model, "act", 2, 2, host_lr=0.05, seed_lr=0.05)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        manager.backward(loss, kd_loss=None)
        manager.step()
    germinate = make_seed_command("germinate", "act[0]", mlp)
    raw = sign_command(germinate, keyring, "ctl").SerializeToString()
    assert manager.handle_adaptation_command(raw)
    (outcome,) = manager.apply_pending(wait=True)
    assert not outcome.ok and "under torch.autocast" in outcome.reason, outcome.reason
    with torch.no_grad():
        model(x)  # one forward outside autocast: recorded
    assert model.act.output_contract[1] == torch.float32
    raw = sign_command(
        make_seed_command("germinate", "act[0]", mlp), keyring, "ctl"
    ).SerializeToString()
    assert run_command(manager, raw)
    manager.close()


def test_the_readme_scaler_recipe_keeps_the_scaler_a_rollback_restored(rig: Rig) -> None:
    """A ROLLBACK applied at ``step()``'s safe point restores a tracked GradScaler; the
    recipe's ``scaler.update()`` after it then applied the abandoned step's overflow to the
    restored scale. The README's recipe ends such a step keeping the restored scale."""
    manager = rig.manager
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    manager.track("scaler", scaler)

    def step(overflow: bool = False) -> dict:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
        manager.backward(scaler.scale(loss * (math.inf if overflow else 1.0)), kd_loss=None)
        for optimizer_id in manager.optimizers.optimizer_ids:
            scaler.unscale_(manager.optimizers.optimizer(optimizer_id))
        report = manager.step(grad_clip_norm=1.0)
        if any(o.ok and o.kind == "rollback" for o in report["commands"]):
            scaler.update(scaler.get_scale())  # ends the step; the scale is the checkpoint's
        else:
            scaler.update()
        return report

    step()
    manager.end_epoch(0)
    saved = scaler.state_dict()
    step()
    step()
    assert scaler.state_dict() != saved
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    report = step(overflow=True)  # the rollback applies at this step's safe point
    assert [o.ok for o in report["commands"]] == [True]
    assert scaler.state_dict() == saved
    assert step()["host_stepped"]  # and the loop goes on (unscale_ again)


class InfiniteGradient(nn.Module):
    """``x + sqrt(w - 1)`` at ``w = 1``: its output is finite (``x``), its gradient is not."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sqrt(self.w - 1.0)


@pytest.mark.parametrize("own_host_optimizer", [False, True], ids=["manager", "own"])
def test_a_seed_whose_gradient_is_never_finite_cannot_collapse_the_hosts_scale(
    tmp_path, keyring, own_host_optimizer: bool
) -> None:
    """Under the README's scaler recipe a seed's infinite gradient made ``unscale_`` report an
    overflow every step: the shared scale halved every step, to 0 after ~150, and from then on
    the host's step was skipped for good, the seed never charged. A seed whose clipped norm is
    not finite for ``BAD_GRADIENT_STEPS`` steps running while the host's is finite is charged
    a fault each step: quarantined, it leaves the scale where the host trains on."""
    from kasmina.manager.slots import BAD_GRADIENT_STEPS
    from kasmina.urza.publish import publish_artifact
    from tests.manager.helpers import PUBLISHER

    store = tmp_path / "urza"
    bad = publish_artifact(InfiniteGradient(), [torch.randn(3, 2)], str(store), "inf", PUBLISHER)
    options = {"host_lr": None} if own_host_optimizer else {}
    rig = Rig(make_config(tmp_path, store), keyring, **options)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    own = torch.optim.Adam(manager.require_registry().host_params, lr=0.01)
    scaler = torch.amp.GradScaler("cpu")
    assert rig.send("germinate", SEED0, bad.artifact_id)
    faults, reports = [], []
    for _ in range(BAD_GRADIENT_STEPS + 6):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
        manager.backward(scaler.scale(loss))
        optimizers = [manager.optimizers.optimizer(o) for o in manager.optimizers.optimizer_ids]
        for optimizer in optimizers + ([own] if own_host_optimizer else []):
            scaler.unscale_(optimizer)
        reports.append(manager.step(grad_clip_norm=1.0))
        if own_host_optimizer:
            scaler.step(own)
            own.zero_grad()
        scaler.update()
        faults.append(seed.faults)
    assert faults[: BAD_GRADIENT_STEPS - 1] == [0] * (BAD_GRADIENT_STEPS - 1)
    assert faults[BAD_GRADIENT_STEPS - 1 : BAD_GRADIENT_STEPS + 2] == [1, 2, 3]
    assert seed.stage == S.QUARANTINE and "gradient not finite" in seed.fault_log[-1]
    scale = scaler.get_scale()
    assert scale >= 2.0**16 / 2 ** (BAD_GRADIENT_STEPS + 2)  # halved while it was charged
    assert scaler.get_scale() == scale
    assert own_host_optimizer or all(r["host_stepped"] for r in reports)
    assert all(torch.isfinite(p).all() for p in manager.require_registry().host_params)


def test_a_seed_finite_in_a_step_the_host_overflowed_ends_its_streak(tmp_path, keyring) -> None:
    """The streak of clipped steps with a seed's norm not finite counted on across a step in
    which the host's overflowed too, whatever the seed's norm was there: a seed finite in that
    step, then not finite once, was charged as if it had never been finite. It starts over."""
    from kasmina.manager.slots import BAD_GRADIENT_STEPS

    rig = Rig(make_config(tmp_path, tmp_path / "urza"), keyring)
    manager = rig.manager
    registry, optimizers = manager.require_registry(), manager.optimizers
    record, seed = registry[SEED0], manager.seed(SEED0)

    def charge(host: bool, finite: bool) -> None:
        optimizers.norms_now = {"host": host, SEED0: finite}
        registry.charge_failed_steps(optimizers)

    for _ in range(BAD_GRADIENT_STEPS - 1):
        charge(host=True, finite=False)
    assert record.bad_gradients == BAD_GRADIENT_STEPS - 1
    charge(host=False, finite=False)  # both overflowed: the streak neither grows nor ends
    assert record.bad_gradients == BAD_GRADIENT_STEPS - 1
    charge(host=False, finite=True)  # the seed was finite: its streak is over
    charge(host=True, finite=False)
    assert record.bad_gradients == 1 and seed.faults == 0
    manager.close()


@pytest.mark.parametrize("own_host_optimizer", [False, True], ids=["manager", "own"])
def test_an_active_seed_whose_gradient_is_never_finite_is_terminated_and_the_host_trains_on(
    tmp_path, store, keyring, mlp, own_host_optimizer: bool
) -> None:
    """An ACTIVE seed's parameters step in the host's optimizer, so its gradient alone not
    finite made the host's clipped norm not finite: every host step was skipped for good, the
    seed never charged (with its own optimizer under ``host_lr=None`` it was charged, but ACTIVE
    has no QUARANTINE: it stayed, halving the shared scale every step). Now its gradient is read
    apart from the rest of the host's: a step that overflowed the host's too charges nothing;
    ``BAD_GRADIENT_STEPS`` steps running charge it, and at its fault limit it is TERMINATED
    (ACTIVE's only way out): its kernel no longer runs, the scale holds, the host trains on."""
    from kasmina.manager.slots import BAD_GRADIENT_STEPS

    options = {"host_lr": None} if own_host_optimizer else {}
    rig = Rig(make_config(tmp_path, store), keyring, **options)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    registry = manager.require_registry()
    own = torch.optim.SGD(registry.host_params, lr=0.05)
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0])
    manager.end_epoch(1)  # a checkpoint with the seed ACTIVE, for the rollback below
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def step(overflow: bool = False) -> dict:
        loss = F.cross_entropy(rig.model(rig.x), rig.y) * (math.inf if overflow else 1.0)
        manager.backward(scaler.scale(loss), kd_loss=None)
        optimizers = [manager.optimizers.optimizer(o) for o in manager.optimizers.optimizer_ids]
        for optimizer in optimizers + ([own] if own_host_optimizer else []):
            scaler.unscale_(optimizer)
        report = manager.step(grad_clip_norm=1.0)
        if own_host_optimizer:
            scaler.step(own)
            own.zero_grad()
        scaler.update()
        return report

    assert not step(overflow=True)["host_stepped"]  # the host's overflow: not the seed's fault
    assert registry[SEED0].bad_gradients == 0 and seed.faults == 0
    for p in seed.seed_parameters():
        p.register_hook(lambda grad: grad * math.inf)
    faults, stepped, scales = [], [], []
    for i in range(BAD_GRADIENT_STEPS + 5):
        if i == 5:  # a checkpoint in the middle of the run, for the rollback below
            manager.end_epoch(2)
        before = torch.cat([p.detach().flatten() for p in registry.host_params])
        stepped.append(step()["host_stepped"])
        changed = not torch.equal(before, torch.cat([p.flatten() for p in registry.host_params]))
        faults.append(seed.faults)
        scales.append((scaler.get_scale(), changed))
    assert faults[: BAD_GRADIENT_STEPS - 1] == [0] * (BAD_GRADIENT_STEPS - 1)
    assert faults[BAD_GRADIENT_STEPS - 1 :] == [1, 2, 3, 3, 3, 3]
    assert seed.stage == S.TERMINATED and "gradient not finite" in seed.fault_log[-1]
    assert SEED0 not in manager.optimizers.seed_ids
    # Its non-finite gradients went with it (under host_lr=None its own optimizer, which
    # zeroed them, was gone before the step's zeroing: they stayed for good).
    assert all(p.grad is None for p in seed.seed_parameters())
    assert scales[-1][0] == scales[-3][0] >= 2.0**10 / 2 ** (BAD_GRADIENT_STEPS + 3)
    assert [changed for _, changed in scales[-2:]] == [True, True]  # the host trains on
    assert stepped[-2:] == [not own_host_optimizer] * 2
    assert all(torch.isfinite(p).all() for p in registry.host_params)
    # A rollback gives back the run its checkpoint was in: kept in memory only, the count was
    # the undone steps' (a first bad step charged at once) or, zeroed, 8 more steps' grace.
    assert run_command(manager, rig.signed(make_rollback_command(2))), manager.command_log[-1]
    assert (seed.stage, seed.faults, registry[SEED0].bad_gradients) == (S.ACTIVE, 0, 5)
    assert [step() and seed.faults for _ in range(3)] == [0, 0, 1]  # the run's 8th step
    manager.close()


def test_a_termination_that_raises_leaves_the_other_seeds_charged(
    tmp_path, store, keyring, mlp, monkeypatch
) -> None:
    """An ACTIVE seed at its gradient fault limit is TERMINATED inside the host's step; a
    transition that raised there (the table's write refused) left the loop: every later seed
    of the step kept its streak (a finite one was not reset, and was charged for steps it had
    been finite in). Logged, the loop goes on; the seed keeps its streak and tries again."""
    from kasmina.manager.slots import BAD_GRADIENT_STEPS

    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    registry, optimizers = manager.require_registry(), manager.optimizers
    seed = manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0])
    seed.faults = seed.fault_limit - 1
    registry[SEED0].bad_gradients = BAD_GRADIENT_STEPS - 1
    registry[SEED1].bad_gradients = 2

    def refused(stage, gate=None) -> None:
        raise RuntimeError("the table's write failed")

    monkeypatch.setattr(seed, "transition_to", refused)
    for p in registry.all_host_params():  # a user's step of a finite host (no norm of its own)
        p.grad = torch.zeros_like(p)
    optimizers.norms_now = {SEED0: False, SEED1: True}
    registry.charge_failed_steps(optimizers)  # raised before
    assert registry[SEED1].bad_gradients == 0  # the later seed's streak ended
    assert seed.stage == S.ACTIVE and seed.faults == seed.fault_limit
    assert registry[SEED0].bad_gradients == BAD_GRADIENT_STEPS  # tried again next time
    assert all(p.grad is None for p in seed.seed_parameters())
    monkeypatch.undo()
    optimizers.norms_now = {SEED0: False, SEED1: True}
    registry.charge_failed_steps(optimizers)
    assert seed.stage == S.TERMINATED and registry[SEED0].bad_gradients == 0
    manager.close()


@pytest.mark.parametrize("overflowed", ["none", "host", "seed"])
def test_a_compiled_cut_in_a_step_the_host_overflowed_too_charges_no_seed(
    tmp_path, store, keyring, mlp, overflowed: str
) -> None:
    """A GradScaler's scale still too high overflows the host and, compiled, an ACTIVE seed's
    kernel backward, whose cut zeroes its non-finite input gradient and sets its cut flag: the
    step charged the seed a fault for the scaler's overflow (eager hands it to the host, and
    charges no seed), at every such step of the scaler's warm-up, a fault limit's worth in a few
    steps. The cut is charged only where the rest of the host's gradients and the seed's own
    were finite (its own not finite: the run of non-finite gradients counts it)."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    registry = manager.require_registry()
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    target = {"host": rig.model.inp.weight, "seed": seed.seed_parameters()[0]}
    if overflowed in target:
        target[overflowed].register_hook(lambda grad: grad * math.inf)
    manager.backward(scaler.scale(F.cross_entropy(rig.model(rig.x), rig.y)), kd_loss=None)
    seed.cut_flag.fill_(True)  # as the compiled cut leaves it (test_compiled_faults)
    for optimizer_id in manager.optimizers.optimizer_ids:
        scaler.unscale_(manager.optimizers.optimizer(optimizer_id))
    report = manager.step(grad_clip_norm=1.0)
    scaler.update()
    assert report["host_stepped"] is (overflowed == "none")
    assert seed.faults == (overflowed == "none") and not bool(seed.cut_flag)
    assert registry[SEED0].bad_gradients == (overflowed == "seed")
    assert list(seed.fault_log) == [CUT_REASON] * (overflowed == "none")
    manager.close()


@pytest.mark.parametrize("overflowed", ["none", "host", "seed"])
def test_an_unclipped_step_with_a_compiled_cut_charges_it_only_where_the_host_is_finite(
    tmp_path, store, keyring, mlp, overflowed: str
) -> None:
    """Without clipping the step has no norms, and a cut was charged whatever the host held:
    a GradScaler's scale too high, unscaled by hand before an unclipped ``step()``, charged the
    seed for the host's own overflow. The host's gradients are read for it now; the seed's own
    overflow (no run of clipped steps to count it here) is charged."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager, seed = rig.manager, rig.manager.seed(SEED0)
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0])
    target = {"host": rig.model.inp.weight, "seed": seed.seed_parameters()[0]}
    if overflowed in target:
        target[overflowed].register_hook(lambda grad: grad * math.inf)
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y), kd_loss=None)
    seed.cut_flag.fill_(True)  # as the compiled cut leaves it (test_compiled_faults)
    manager.step(grad_clip_norm=0.0)
    assert seed.faults == (overflowed != "host") and not bool(seed.cut_flag)
    manager.close()
