"""The manager's public calls made in the wrong order or from the wrong place: each is refused
with a reason before anything changes, or returns at once, and training goes on (design §5)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.nn import functional as F

import kasmina
from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.control.commands import KasminaCommand, to_kasmina_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import SEED0, Host, Rig, S, make_config

SEED1 = "out[1]"


def test_a_model_another_manager_manages_is_refused(rig: Rig, tmp_path, store, keyring) -> None:
    """Two managers over one model's seeds (``register``) or its parameters (another target)
    would both step the host and tear down each other's seeds."""
    other = KasminaKernelManager(make_config(tmp_path / "b", store), keyring=keyring)
    with pytest.raises(ValueError, match="managed by another manager"):
        other.register(rig.model)
    with pytest.raises(ValueError, match="managed by another manager"):
        other.attach(rig.model, "inp", 2, 4)
    assert type(rig.model.inp) is torch.nn.Linear  # the refused attach took its slot off again
    assert other.registry is None and rig.train(1)["host_stepped"]
    rig.manager.close()  # released: another manager may take the model
    other.register(rig.model)
    assert other.require_registry().slots == [rig.model.out]


def test_a_closed_manager_attaches_nothing(tmp_path, store, keyring: Keyring) -> None:
    manager = KasminaKernelManager(make_config(tmp_path, store), keyring=keyring)
    manager.close()
    model = Host()
    with pytest.raises(RuntimeError, match="closed"):
        manager.attach(model, "out", 2, 2)
    assert type(model.out) is torch.nn.Linear and manager.registry is None


@pytest.mark.parametrize("epoch", [2**31, 2**32, 10**30])
def test_an_epoch_beyond_int32_is_refused(rig: Rig, epoch: int) -> None:
    """The wire carries epochs as 32-bit integers (a ROLLBACK's target as int32): a later
    epoch made every ``system_state()`` raise, for good, since epochs only go up."""
    with pytest.raises(ValueError, match="epoch must be an int in"):
        rig.manager.end_epoch(epoch)
    assert rig.manager.epoch == rig.manager.state.epoch
    rig.manager.end_epoch(2**31 - 1)
    assert rig.manager.system_state().current_epoch == 2**31 - 1


def test_an_epoch_a_queued_rollback_puts_behind_the_clock_is_refused(rig: Rig) -> None:
    """``end_epoch(n)`` checked that ``n`` goes forward before its own safe point applied a
    queued ROLLBACK to a later checkpoint (one an earlier rollback left on disk): epoch 2 was
    then written over a clock at 3, and the checkpoint just restored was deleted."""
    manager = rig.manager
    for epoch in range(4):
        rig.train(1)
        manager.end_epoch(epoch)
    send = manager.handle_adaptation_command
    assert send(rig.signed(make_rollback_command(1))) and manager.apply_pending()[0].ok
    assert manager.epoch == 1 and manager.checkpoints.epochs() == [0, 1, 2, 3]
    assert send(rig.signed(make_rollback_command(3)))
    with pytest.raises(ValueError, match="not after the last epoch ended"):
        manager.end_epoch(2)
    assert manager.command_log[-1][1:3] == ("rollback", True)  # applied, as at any safe point
    assert manager.epoch == 3 and manager.checkpoints.epochs() == [0, 1, 2, 3]
    rig.train(1)
    manager.end_epoch(4)


def test_apply_pending_from_inside_its_own_application_returns_at_once(rig: Rig) -> None:
    """A telemetry sink that applies pending commands, waiting, ran on the thread that was
    applying them: it waited on itself for ever."""
    manager, calls = rig.manager, []

    class Sink:
        def send(self, packet) -> None:
            if any(m.name == "command.complete" for m in packet.metrics):
                calls.append(manager.apply_pending(wait=True))

    manager.telemetry.add_sink(Sink())
    assert manager.handle_adaptation_command(
        rig.signed(make_seed_command("terminate", SEED1, "", {}))
    )
    done: list[object] = []
    worker = threading.Thread(
        target=lambda: done.append(manager.apply_pending(wait=True)), daemon=True
    )
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "apply_pending waited on itself"
    assert [o.ok for o in done[0]] == [True] and calls == [[]]
    assert rig.stage(SEED1) == S.TERMINATED


def test_a_manager_whose_slot_was_detached_measures_and_applies_nothing(rig: Rig, mlp) -> None:
    """After ``kasmina.detach`` the seed no longer runs: its evaluation measured no effect and
    G5 fossilized it; the epoch checkpointed the stripped model. All refused now, as step()."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    kasmina.detach(rig.model)
    before = clone_state(rig.model.state_dict())
    with pytest.raises(RuntimeError, match="taken out of the model"):
        manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    with pytest.raises(RuntimeError, match="taken out of the model"):
        manager.end_epoch(1)
    assert not rig.send("advance", SEED0)
    assert "taken out of the model" in manager.command_log[-1][3]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.epoch == 0
    after = rig.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_commands_queued_behind_a_close_are_refused(rig: Rig, mlp) -> None:
    """``close()`` from a telemetry sink (or another thread) while a batch applies: the
    commands behind it applied anyway, a GERMINATE hooking a kernel into the closed manager."""
    manager = rig.manager

    class Sink:
        armed = True

        def send(self, packet) -> None:
            if self.armed and any(m.name == "command.complete" for m in packet.metrics):
                self.armed = False
                manager.close()

    for raw in (
        rig.signed(make_seed_command("germinate", SEED0, mlp, {})),
        rig.signed(make_seed_command("germinate", SEED1, mlp, {})),
    ):
        assert manager.handle_adaptation_command(raw)
    manager.telemetry.add_sink(Sink())
    outcomes = manager.apply_pending(wait=True)
    assert [o.ok for o in outcomes] == [True, False]
    assert "closed" in outcomes[1].reason
    record = manager.registry[SEED1]
    assert record.kernel is None and rig.stage(SEED1) == S.DORMANT
    assert SEED1 not in manager.optimizers.seed_ids


def test_an_isolation_check_before_step_does_not_clear_the_steps_verdict(
    rig: Rig, mlp: str
) -> None:
    """``check_gradient_isolation()`` reads (and consumes) the step's evidence; a leak it found
    must still keep that step's host optimizer from stepping when ``step()`` checks again."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    kernel, weight = manager.seed(SEED0).kernel, rig.model.inp.weight
    forward = kernel.forward
    kernel.forward = lambda x: forward(x) + 0.0 * weight.sum()  # reaches a host parameter
    before = weight.detach().clone()
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    assert not manager.check_gradient_isolation()
    assert not manager.check_gradient_isolation()  # the step is still not clean
    report = manager.step()
    assert not report["isolation_clean"] and not report["host_stepped"]
    assert torch.equal(weight, before)
    assert manager.guard.violating_steps == 1  # one violation found, counted once
    kernel.forward = forward
    manager.backward(F.cross_entropy(rig.model(rig.x), rig.y))
    assert manager.check_gradient_isolation()  # the next step starts clean
    assert manager.step()["host_stepped"]


def test_checks_after_each_micro_batch_count_a_leaking_step_once(rig: Rig, mlp: str) -> None:
    """A check after each micro-batch of one leaking step charged the seed at each: three
    micro-batches tripped the breaker (``max_isolation_violations=3``) on one step, and counted
    three violating steps. A step counts once per seed however often it is checked."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    kernel, weight = manager.seed(SEED0).kernel, rig.model.inp.weight
    forward = kernel.forward
    kernel.forward = lambda x: forward(x) + 0.0 * weight.sum()  # reaches a host parameter
    for step in range(2):
        for rows in (slice(0, 3), slice(3, 6), slice(6, None)):
            manager.backward(F.cross_entropy(rig.model(rig.x[rows]), rig.y[rows]) / 3)
            assert not manager.check_gradient_isolation()
        assert not manager.step()["host_stepped"]
        assert manager.seed(SEED0).isolation_violations == step + 1
        assert manager.guard.violating_steps == step + 1 and rig.stage(SEED0) == S.ISOLATED_INIT
    assert manager.counters["isolation_seed_violations"] == 2
    for rows in (slice(0, 3), slice(3, None)):  # the third leaking step trips it
        manager.backward(F.cross_entropy(rig.model(rig.x[rows]), rig.y[rows]) / 2)
        manager.check_gradient_isolation()
    manager.step()
    assert rig.stage(SEED0) == S.QUARANTINE and manager.guard.breaker_trips == 1


@pytest.mark.parametrize("kind", ["cull", "rollback"])
def test_a_command_executed_while_a_forwards_graph_is_open_is_refused(rig: Rig, mlp, kind):
    """``manager.execute`` between a forward and its backward applied the command at once: a
    CULL freed the kernel, a ROLLBACK rewrote the weights, that forward's graph still used, and
    the user's backward raised. Refused, nothing changed, as ``apply_pending`` applies none
    then (after the backward too); after the step it applies."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    rig.train(1)
    if kind == "cull":
        command = to_kasmina_command(make_seed_command("cull", SEED0, "", {}))
    else:
        command = to_kasmina_command(make_rollback_command(0))
    assert isinstance(command, KasminaCommand)
    out = rig.model(rig.x)
    before = clone_state(rig.model.state_dict())
    assert not manager.execute(command)
    assert "recorded a graph" in manager.command_log[-1][3]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and manager.seed(SEED0).kernel is not None
    after = rig.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # A command that neither frees a kernel nor rewrites weights runs with the graph open.
    germinate = to_kasmina_command(make_seed_command("germinate", SEED1, mlp, {}))
    assert isinstance(germinate, KasminaCommand)
    assert manager.execute(germinate) and rig.stage(SEED1) == S.ISOLATED_INIT
    manager.backward(F.cross_entropy(out, rig.y))
    assert not manager.execute(command) and rig.stage(SEED0) == S.ISOLATED_INIT
    assert manager.step()["seeds_stepped"] == [SEED0]
    assert manager.execute(command)  # a safe point now
    assert rig.stage(SEED0) == (S.COOLDOWN if kind == "cull" else S.ISOLATED_INIT)


def test_a_terminate_executed_while_a_forwards_graph_is_open_is_refused(rig: Rig, mlp) -> None:
    """A TERMINATE releases the seed's kernel as a CULL does: refused while a forward's graph
    may still use it, applied after the step."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.seed(SEED0).transition_to(S.QUARANTINE)  # a stage TERMINATE leaves
    command = to_kasmina_command(make_seed_command("terminate", SEED0, "", {}))
    assert isinstance(command, KasminaCommand)
    out = rig.model(rig.x)
    assert not manager.execute(command)
    assert "recorded a graph" in manager.command_log[-1][3]
    assert rig.stage(SEED0) == S.QUARANTINE and manager.seed(SEED0).kernel is not None
    manager.backward(F.cross_entropy(out, rig.y))
    manager.step()
    assert manager.execute(command) and rig.stage(SEED0) == S.TERMINATED
