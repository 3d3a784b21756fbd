"""An interrupt at a safe point (KeyboardInterrupt, any BaseException that is not an Exception)
propagates, but it breaks nothing (docs/design.md §3, §5): the operation it lands in undoes
itself or completes, every command taken gets an outcome or goes back to the queue, and the
handler's counts add up (``accepted == executed + failed + pending``).

The interrupt is raised deterministically where a Ctrl-C could land: by a telemetry sink when
a given event is sent (sinks are called on the training thread, in the middle of the change),
or by a stand-in for the nonce ledger's sync."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
import torch

from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.control.commands import KasminaCommand
from kasmina.isolation.optimizers import HOST_ID as HOST
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.leyline import TelemetryPacket
from kasmina.manager.executor import CommandOutcome
from kasmina.stages import StateColumn
from tests.manager.helpers import SEED0, SEED1, Rig, S, make_config


class CtrlC:
    """A telemetry sink that raises ``KeyboardInterrupt`` once, on the first event called
    ``name`` whose labels include ``labels``."""

    def __init__(self, name: str, **labels: str) -> None:
        self.name = name
        self.labels = labels
        self.fired = False

    def send(self, packet: TelemetryPacket) -> None:
        if self.fired:
            return
        for metric in packet.metrics:
            if metric.name == self.name and all(
                metric.labels.get(k) == v for k, v in self.labels.items()
            ):
                self.fired = True
                raise KeyboardInterrupt("Ctrl-C")


def interrupt_on(rig: Rig, name: str, **labels: str) -> CtrlC:
    sink = CtrlC(name, **labels)
    rig.manager.telemetry.add_sink(sink)
    return sink


def queue(rig: Rig, *commands) -> list[str]:
    """Send each command (accepted, queued); their ids."""
    for command in commands:
        assert rig.manager.handle_adaptation_command(rig.signed(command))
    return [command.command_id for command in commands]


def two_germinates(rig: Rig, mlp: str) -> list[str]:
    """Queue a GERMINATE of each seed (their kernel cached first); their ids."""
    rig.manager.loader.original(mlp)
    return queue(
        rig,
        make_seed_command("germinate", SEED0, mlp),
        make_seed_command("germinate", SEED1, mlp),
    )


def assert_counts_add_up(rig: Rig, executed: int, failed: int) -> None:
    stats = rig.manager.handler.stats
    assert (stats["executed"], stats["failed"]) == (executed, failed), stats
    assert stats["accepted"] == executed + failed + len(rig.manager.pending)


def assert_germinate_undone(rig: Rig, record, artifact_id: str, row, timeline, command_id) -> None:
    """The interrupted GERMINATE left nothing behind: the seed's row, kernel, pin, timeline as
    before, the command reported as changing nothing; and the same GERMINATE, sent again, goes
    through."""
    manager = rig.manager
    assert record.stage == S.DORMANT and record.seed.state_table.read_row(record.index) == row
    assert record.kernel is None and record.seed.kernel is None and record.artifact_id is None
    assert not manager.kernel_cache.is_pinned(artifact_id) and not record.pinned
    assert list(record.timeline) == timeline
    assert manager.command_log[-1][:3] == (command_id, "seed.germinate", False)
    assert manager.command_log[-1][3] == "interrupted by KeyboardInterrupt; nothing changed"
    assert_counts_add_up(rig, executed=0, failed=1)
    assert rig.send("germinate", SEED0, artifact_id) and rig.stage(SEED0) == S.ISOLATED_INIT


def test_an_interrupted_germinate_leaves_the_seed_exactly_as_it_was(rig: Rig, mlp) -> None:
    """Ctrl-C after the table applied DORMANT -> ISOLATED_INIT (a sink raises on that event):
    the GERMINATE undoes itself, stage included, reports itself refused and re-raises."""
    manager = rig.manager
    rig.train(1)
    manager.loader.original(mlp)  # cached: applied at the next safe point
    record = manager.registry[SEED0]
    table = record.seed.state_table
    row, timeline = table.read_row(record.index), list(record.timeline)
    ctrl_c = interrupt_on(rig, "lifecycle.transition", to="ISOLATED_INIT")
    (command_id,) = queue(rig, make_seed_command("germinate", SEED0, mlp))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert ctrl_c.fired
    assert SEED0 not in manager.optimizers.seed_ids
    # The sinks heard the transition, and hear it undone: a consumer that follows stages
    # by transition events is left at DORMANT, not ISOLATED_INIT.
    heard = [(e.labels["from"], e.labels["to"]) for e in rig.sink.events("lifecycle.transition")]
    assert heard[-2:] == [("DORMANT", "ISOLATED_INIT"), ("ISOLATED_INIT", "DORMANT")]
    assert rig.sink.events("lifecycle.transition")[-1].labels["cause"] == "undo"
    assert_germinate_undone(rig, record, mlp, row, timeline, command_id)
    rig.train(1)
    assert torch.isfinite(rig.model(rig.x)).all()


def _state_of(optimizer: torch.optim.Optimizer) -> list[tuple[int, str, object]]:
    """The optimizer's running state, cloned: (parameter id, key, value) each."""
    return [
        (id(p), key, value.clone() if isinstance(value, torch.Tensor) else value)
        for p, state in optimizer.state.items()
        for key, value in state.items()
    ]


def _same_state(a: list[tuple[int, str, object]], b: list[tuple[int, str, object]]) -> bool:
    """Bit for bit (``torch.equal`` on tensors)."""
    return len(a) == len(b) and all(
        x[:2] == y[:2]
        and (torch.equal(x[2], y[2]) if isinstance(x[2], torch.Tensor) else x[2] == y[2])
        for x, y in zip(a, b, strict=True)
    )


class _CtrlCOnRegistration:
    """A telemetry sink that raises ``KeyboardInterrupt`` once, on ``seed_optimizer_created``
    (sent once the optimizer is registered); it keeps the parameters registered for the seed."""

    def __init__(self, rig: Rig, seed_id: str) -> None:
        self.optimizers, self.seed_id = rig.manager.optimizers, seed_id
        self.params: list[torch.Tensor] = []

    def send(self, packet: TelemetryPacket) -> None:
        if not self.params and any(m.name == "seed_optimizer_created" for m in packet.metrics):
            self.params = self.optimizers.parameters(self.seed_id)
            raise KeyboardInterrupt("Ctrl-C")


@pytest.mark.parametrize("where", ["in its event", "after it returned"])
def test_a_germinate_interrupted_once_its_optimizer_is_registered_leaves_none(
    rig: Rig, mlp, monkeypatch, where: str
) -> None:
    """Ctrl-C once the seed's optimizer is registered: in the event that announces it (a sink
    raises), or as ``create_seed_optimizer`` returns. The GERMINATE undoes itself, optimizer
    and parameter ownership included, so the seed is DORMANT with no optimizer (none is kept
    in a checkpoint) and the same GERMINATE, sent again, goes through."""
    manager = rig.manager
    rig.train(1)
    manager.loader.original(mlp)
    optimizers = manager.optimizers
    record = manager.registry[SEED0]
    table = record.seed.state_table
    row, timeline = table.read_row(record.index), list(record.timeline)
    host_state = _state_of(optimizers.optimizer(HOST))
    assert host_state  # the host has trained: its running state is there to compare
    host_params = optimizers.parameters(HOST)
    if where == "in its event":
        sink = _CtrlCOnRegistration(rig, SEED0)
        manager.telemetry.add_sink(sink)
    else:
        create, registered = optimizers.create_seed_optimizer, []

        def create_then_interrupt(seed_id: str, params, **options) -> torch.optim.Optimizer:
            optimizer = create(seed_id, params, **options)
            if not registered:
                registered.extend(optimizers.parameters(seed_id))
                raise KeyboardInterrupt("Ctrl-C")
            return optimizer

        monkeypatch.setattr(optimizers, "create_seed_optimizer", create_then_interrupt)
    (command_id,) = queue(rig, make_seed_command("germinate", SEED0, mlp))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    claimed = sink.params if where == "in its event" else registered
    assert claimed  # the interrupt landed with the optimizer registered
    assert optimizers.optimizer_ids == [HOST] and SEED0 not in optimizers.seed_ids
    assert all(optimizers.owner_of(p) is None for p in claimed)
    assert all(a is b for a, b in zip(optimizers.parameters(HOST), host_params, strict=True))
    assert _same_state(_state_of(optimizers.optimizer(HOST)), host_state)
    assert_germinate_undone(rig, record, mlp, row, timeline, command_id)
    assert optimizers.optimizer_ids == [HOST, SEED0]
    assert all(optimizers.owner_of(p) == SEED0 for p in optimizers.parameters(SEED0))
    rig.train(1)
    assert torch.isfinite(rig.model(rig.x)).all()


@pytest.mark.parametrize("owner", ["s", HOST])
def test_creating_an_optimizer_is_all_or_nothing(owner: str) -> None:
    """A telemetry sink that raises on the creation's event (a Ctrl-C) leaves no optimizer and
    no claimed parameter behind, so the same creation, retried, goes through: a seed's, and
    the host's (an INITIALIZE_HOST optimizer command's)."""
    fired: list[str] = []

    class Telemetry:
        def emit(self, name: str, *_args, **_kwargs) -> None:
            if not fired:
                fired.append(name)
                raise KeyboardInterrupt("Ctrl-C")

    optimizers = IsolatedOptimizerManager(telemetry=Telemetry())
    params = list(torch.nn.Linear(2, 2).parameters())

    def create() -> None:
        if owner == HOST:
            optimizers.initialize_host(params)
        else:
            optimizers.create_seed_optimizer(owner, params)

    with pytest.raises(KeyboardInterrupt):
        create()
    assert fired == ["optimizer_created" if owner == HOST else "seed_optimizer_created"]
    assert optimizers.optimizer_ids == [] and all(optimizers.owner_of(p) is None for p in params)
    create()
    assert optimizers.optimizer_ids == [owner]
    assert all(optimizers.owner_of(p) == owner for p in params)


@pytest.mark.parametrize(
    ("event", "labels"),
    [
        # after the table applied HARVESTING, before any observer heard of it
        ("lifecycle.transition", {"to": "HARVESTING"}),
        # in the manager's observer, after the field report and before the release
        ("seed.field_report", {}),
        # in COOLDOWN's announcement, before the command's embargo is written
        ("lifecycle.transition", {"to": "COOLDOWN"}),
    ],
)
def test_an_interrupted_cull_completes(rig: Rig, mlp, event: str, labels: dict) -> None:
    """Ctrl-C once the table applied HARVESTING: the CULL completes (kernel, optimizer and pin
    released, COOLDOWN with its embargo), reports itself done and re-raises; the seed recycles
    and takes a new kernel as after any cull."""
    manager = rig.manager
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    record = manager.registry[SEED0]
    ctrl_c = interrupt_on(rig, event, **labels)
    (command_id,) = queue(rig, make_seed_command("cull", SEED0, parameters={"embargo_epochs": 7}))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert ctrl_c.fired
    assert record.stage == S.COOLDOWN
    assert record.kernel is None and record.seed.kernel is None
    assert SEED0 not in manager.optimizers.seed_ids
    assert not manager.kernel_cache.is_pinned(mlp) and not record.pinned
    assert manager.registry.table.read_row(record.index)[StateColumn.EMBARGO_COUNTER.name] == 7
    assert manager.command_log[-1][:3] == (command_id, "seed.cull", True)
    assert manager.command_log[-1][3].startswith("interrupted by KeyboardInterrupt; completed")
    assert_counts_add_up(rig, executed=2, failed=0)
    for epoch in range(9):  # the embargo runs out: COOLDOWN -> RECYCLING -> DORMANT
        rig.train(1)
        manager.end_epoch(epoch)
    assert record.stage == S.DORMANT
    assert rig.send("germinate", SEED0, mlp) and rig.stage(SEED0) == S.ISOLATED_INIT


def test_an_interrupt_while_nonces_are_made_durable_puts_every_command_taken_back(
    rig: Rig, mlp, monkeypatch
) -> None:
    """Ctrl-C in the ledger's sync: none of the commands taken began, and the verifier syncs
    their nonces again at its next call, so they all go back to the queue, in order, and the
    next safe point makes them durable and applies them (each once)."""
    manager = rig.manager
    ledger = manager.verifier._ledger
    assert ledger is not None
    ids = two_germinates(rig, mlp)
    synced: list[int] = []
    real_sync = ledger.sync

    def sync(seq: int) -> None:
        if not synced:
            synced.append(-1)
            raise KeyboardInterrupt("Ctrl-C")
        synced.append(seq)
        real_sync(seq)

    monkeypatch.setattr(ledger, "sync", sync)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert not manager.command_log and len(manager.pending) == 2
    assert_counts_add_up(rig, executed=0, failed=0)
    assert rig.stage(SEED0) == S.DORMANT and rig.stage(SEED1) == S.DORMANT
    outcomes = manager.apply_pending()
    assert len(synced) == 2 and synced[1] > 0  # synced again before anything applied
    assert [(o.command_id, o.ok) for o in outcomes] == [(i, True) for i in ids]
    assert_counts_add_up(rig, executed=2, failed=0)
    assert rig.stage(SEED0) == S.ISOLATED_INIT and rig.stage(SEED1) == S.ISOLATED_INIT


def test_commands_behind_an_interrupted_one_go_back_to_the_queue(rig: Rig, mlp) -> None:
    """Ctrl-C in the first of three commands: it undoes itself and is reported; the two behind
    it never began, so they go back to the front of the queue, in order, and the next safe point
    applies them (each once)."""
    manager = rig.manager
    manager.loader.original(mlp)
    index = str(manager.registry[SEED0].index)
    interrupt_on(rig, "lifecycle.transition", seed_index=index, to="ISOLATED_INIT")
    ids = queue(
        rig,
        make_seed_command("germinate", SEED0, mlp),
        make_seed_command("germinate", SEED1, mlp),
        make_seed_command("cull", SEED1),
    )
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert len(manager.pending) == 2 and [entry[0] for entry in manager.command_log] == ids[:1]
    assert_counts_add_up(rig, executed=0, failed=1)
    assert rig.stage(SEED1) == S.DORMANT
    outcomes = manager.apply_pending()
    assert [(o.command_id, o.ok) for o in outcomes] == [(ids[1], True), (ids[2], True)]
    assert [entry[0] for entry in manager.command_log] == ids
    assert_counts_add_up(rig, executed=2, failed=1)
    assert rig.stage(SEED0) == S.DORMANT and rig.stage(SEED1) == S.COOLDOWN


def test_an_interrupt_in_a_commands_report_applies_nothing_twice(rig: Rig, mlp) -> None:
    """Ctrl-C in the telemetry of the first command's completion: that command was applied and
    counted, so it stays done; the one behind it goes back to the queue and applies once."""
    manager = rig.manager
    interrupt_on(rig, "command.complete")
    ids = two_germinates(rig, mlp)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert rig.stage(SEED0) == S.ISOLATED_INIT and len(manager.pending) == 1
    assert_counts_add_up(rig, executed=1, failed=0)
    (outcome,) = manager.apply_pending()
    assert (outcome.command_id, outcome.ok) == (ids[1], True)
    assert [(entry[0], entry[2]) for entry in manager.command_log] == [(i, True) for i in ids]
    assert_counts_add_up(rig, executed=2, failed=0)
    assert rig.stage(SEED1) == S.ISOLATED_INIT


def test_an_interrupted_announcement_still_lets_the_owner_hear_of_the_change(rig: Rig, mlp) -> None:
    """Ctrl-C in the telemetry event of an applied ADVANCE: the table has applied it, so its
    owner still hears of it (the manager's side effects: here the seed's timeline) before the
    interrupt propagates, and the command is reported done."""
    manager = rig.manager
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    record = manager.registry[SEED0]
    ctrl_c = interrupt_on(rig, "lifecycle.transition", to="COMPATIBILITY_CHECK")
    (command_id,) = queue(rig, make_seed_command("advance", SEED0))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert ctrl_c.fired and record.stage == S.COMPATIBILITY_CHECK
    assert record.timeline[-1][2] == "COMPATIBILITY_CHECK"
    assert manager.command_log[-1][:3] == (command_id, "seed.advance", True)


def test_a_rollback_interrupted_after_its_commit_is_reported_applied(rig: Rig, monkeypatch) -> None:
    """Ctrl-C in the epoch boundary a rollback replays after its commit: the state is the
    checkpoint's, so the command is reported applied (as when the replay fails), once."""
    manager = rig.manager
    for epoch in range(3):
        rig.train(1)
        manager.end_epoch(epoch)
    rig.train(2)

    def boundary() -> list[str]:
        raise KeyboardInterrupt("Ctrl-C")

    monkeypatch.setattr(manager.execution, "epoch_boundary", boundary)
    (command_id,) = queue(rig, make_rollback_command(1))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert manager.epoch == 1  # committed
    assert [entry[:3] for entry in manager.command_log] == [(command_id, "rollback", True)]
    assert "after it committed" in manager.command_log[-1][3]
    assert_counts_add_up(rig, executed=1, failed=0)


def test_an_interrupt_after_a_command_applied_reports_it_once(rig: Rig, mlp, monkeypatch) -> None:
    """Ctrl-C after ``apply`` returned, before the handler heard of it (in the step timer): the
    command took effect, so it is reported applied, once, and not as refused besides."""
    manager = rig.manager
    rig.train(1)
    manager.loader.original(mlp)
    (command_id,) = queue(rig, make_seed_command("germinate", SEED0, mlp))
    timer, fired = manager.intake.perf["command"], []

    def add_ns(_ns: int) -> None:
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt("Ctrl-C")

    monkeypatch.setattr(timer, "add_ns", add_ns)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert [entry[:3] for entry in manager.command_log] == [(command_id, "seed.germinate", True)]
    assert_counts_add_up(rig, executed=1, failed=0)


def test_a_command_interrupted_as_its_apply_returns_is_not_applied_again(
    rig: Rig, mlp, monkeypatch
) -> None:
    """Ctrl-C as ``apply`` returns, before the intake has the command's outcome: the command
    took effect, so it is not queued again (its nonce is durable); it is reported once, with
    the outcome ``apply`` noted (one log entry, not a second one saying it was refused), and
    the one behind it goes back to the front of the queue and applies once."""
    manager = rig.manager
    applied = ctrl_c_as_the_first_apply_returns(manager, monkeypatch)
    ids = two_germinates(rig, mlp)
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert applied == [(ids[0], True)] and rig.stage(SEED0) == S.ISOLATED_INIT
    assert len(manager.pending) == 1  # only the command behind it
    assert [entry[:3] for entry in manager.command_log if entry[0] == ids[0]] == [
        (ids[0], "seed.germinate", True)
    ]
    stats = manager.handler.stats
    assert (stats["executed"], stats["failed"]) == (1, 0)  # reported once, as it ended
    assert stats["accepted"] == stats["executed"] + stats["failed"] + len(manager.pending)
    log_size = len(manager.command_log)
    (outcome,) = manager.apply_pending()
    assert (outcome.command_id, outcome.ok) == (ids[1], True)
    assert applied == [(ids[0], True), (ids[1], True)]  # the first never again
    assert [entry[0] for entry in manager.command_log[log_size:]] == [ids[1]]
    assert rig.stage(SEED0) == S.ISOLATED_INIT and rig.stage(SEED1) == S.ISOLATED_INIT
    stats = manager.handler.stats  # a copy: read again after the step applied the rest
    assert not manager.pending and stats["accepted"] == stats["executed"] + stats["failed"]


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_during_a_rollbacks_commit_waits_until_it_is_done(rig: Rig, monkeypatch) -> None:
    """A SIGINT that lands in the commit (nothing there can fail, but a signal can arrive
    anywhere) is delivered once the rollback is whole: optimizers adopted, records, epoch and
    the command's outcome all the checkpoint's."""
    manager = rig.manager
    for epoch in range(3):
        rig.train(1)
        manager.end_epoch(epoch)
    rig.train(2)
    adopt, fired = IsolatedOptimizerManager.adopt, []

    def adopt_then_ctrl_c(self, *args, **kwargs):
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)
        return adopt(self, *args, **kwargs)

    monkeypatch.setattr(IsolatedOptimizerManager, "adopt", adopt_then_ctrl_c)
    (command_id,) = queue(rig, make_rollback_command(1))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert fired and manager.epoch == 1 and manager.counters["rollbacks_committed"] == 1
    assert [entry[:3] for entry in manager.command_log] == [(command_id, "rollback", True)]
    assert_counts_add_up(rig, executed=1, failed=0)
    rig.train(1)  # and training goes on


def _ctrl_c_before(monkeypatch, owner: object, name: str, call: int = 1) -> list[int]:
    """Patch ``owner.name`` to raise a real SIGINT at its ``call``-th call, then run as it
    would; the calls made."""
    real, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)
    return calls


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_while_a_cull_completes_waits_until_the_seed_is_in_cooldown(
    rig: Rig, mlp, monkeypatch
) -> None:
    """A SIGINT that lands after HARVESTING, while the kernel is released: the seed used to
    stay in HARVESTING for good (no CULL or GERMINATE accepted there)."""
    manager = rig.manager
    rig.train(1)
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    # The second release: the one that completes the cull, after HARVESTING's announcement.
    calls = _ctrl_c_before(monkeypatch, manager.execution.effects, "release", call=2)
    queue(rig, make_seed_command("cull", SEED0))
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert len(calls) == 2 and rig.stage(SEED0) == S.COOLDOWN
    assert manager.command_log[-1][1:3] == ("seed.cull", True)
    rig.train(1)


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_while_the_optimizers_step_waits_until_the_step_is_counted(
    rig: Rig, monkeypatch
) -> None:
    """A SIGINT that lands in the optimizers' steps: stepped but not zeroed or counted, the
    next backward would have added to gradients already applied, applying them twice."""
    manager = rig.manager
    rig.train(1)
    loss = torch.nn.functional.cross_entropy(rig.model(rig.x), rig.y)
    manager.backward(loss)
    step = manager.global_step
    calls = _ctrl_c_before(monkeypatch, manager.optimizers, "step_many")
    with pytest.raises(KeyboardInterrupt):
        manager.step()
    assert calls and manager.global_step == step + 1
    assert all(p.grad is None for p in manager.require_registry().host_params)
    rig.train(1)


class CtrlCOnAck:
    """A sink that takes a moment over ``command.ack``, while the user presses Ctrl-C."""

    def __init__(self) -> None:
        self.fired = False

    def send(self, packet: TelemetryPacket) -> None:
        if not self.fired and any(m.name == "command.ack" for m in packet.metrics):
            self.fired = True
            signal.raise_signal(signal.SIGINT)


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_while_a_command_arrives_on_the_main_thread_loses_nothing(rig: Rig, mlp) -> None:
    """Between the nonce's use (the ack) and the queue, the command was lost: counted accepted,
    never queued, applied or reported, and its bytes a replay from then on."""
    manager = rig.manager
    sink = CtrlCOnAck()
    manager.telemetry.add_sink(sink)
    with pytest.raises(KeyboardInterrupt):
        manager.handle_adaptation_command(rig.signed(make_seed_command("germinate", SEED0, mlp)))
    assert sink.fired and len(manager.pending) == 1
    assert_counts_add_up(rig, executed=0, failed=0)
    assert [o.ok for o in manager.apply_pending(wait=True)] == [True]
    assert rig.stage(SEED0) == S.ISOLATED_INIT


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_once_the_epoch_checkpoint_is_written_lets_the_epoch_end_again(
    rig: Rig, mlp, monkeypatch
) -> None:
    """A SIGINT that lands after the checkpoint's write (while old ones are pruned): the epoch
    had not ended, yet its retry was refused for good ("not after this run's checkpoints"),
    and the boundary's tick never ran."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    index = manager.require_registry()[SEED0].index
    calls = _ctrl_c_before(monkeypatch, manager.checkpoints, "_prune")
    with pytest.raises(KeyboardInterrupt):
        manager.end_epoch(0)
    assert calls and manager.epoch == -1 and manager.checkpoints.epochs() == [0]
    assert manager.require_registry().table.read_row(index)["EPOCHS_IN_STATE"] == 0
    rig.train(1)
    manager.end_epoch(0)  # the same boundary, again: written anew, then ticked once
    assert manager.epoch == 0 and manager.checkpoints.epochs() == [0]
    assert manager.require_registry().table.read_row(index)["EPOCHS_IN_STATE"] == 1


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_in_the_epoch_boundary_waits_until_the_epoch_has_ticked(
    rig: Rig, mlp, monkeypatch
) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    index = manager.require_registry()[SEED0].index
    calls = _ctrl_c_before(monkeypatch, manager.require_registry().table, "tick")
    with pytest.raises(KeyboardInterrupt):
        manager.end_epoch(0)
    assert calls and manager.epoch == 0  # the boundary is whole: epoch and tick together
    assert manager.require_registry().table.read_row(index)["EPOCHS_IN_STATE"] == 1


def test_stored_kd_losses_through_a_released_kernel_are_dropped(
    tmp_path, store, keyring, mlp
) -> None:
    """A forward whose KD loss was never collected (a step cut short after its forward), then
    a CULL: the stored loss ran through the released kernel, and the next step's KD backward
    raised on its emptied parameters. The CULL now waits for a step's end (that forward's
    graph may still be used), where the stored losses are gone; its release drops any left."""
    rig = Rig(make_config(tmp_path, store, kd_enabled=True), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    teacher = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    rig.train(1, teacher)
    manager.set_teacher_logits(teacher)
    rig.model(rig.x)  # the forward of a step that went no further
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0, "", {})))
    assert manager.apply_pending(wait=True) == []  # that forward's graph may still be used
    manager.end_epoch(0)  # and the epoch's end leaves it to the step
    assert len(manager.pending) == 1 and rig.stage(SEED0) == S.ISOLATED_INIT
    assert rig.train(1, teacher)["commands"][0].ok  # applied at the step's end
    assert rig.stage(SEED0) == S.COOLDOWN
    record = manager.require_registry()[SEED0]
    assert record.slot.get_and_clear_kd_losses() is None  # nothing through the released kernel
    assert rig.train(1, teacher)["host_stepped"]  # an ordinary step


def ctrl_c_as_the_first_apply_returns(manager, monkeypatch) -> list[tuple[str, bool]]:
    """Each command ``apply`` ran, with its outcome, as a list that fills; a Ctrl-C lands as
    the first ``apply`` returns (after its command took effect, or was refused)."""
    real_apply, applied = manager.execution.apply, []

    def apply(command: KasminaCommand, **kwargs: Any) -> CommandOutcome:
        outcome = real_apply(command, **kwargs)
        applied.append((command.command_id, outcome.ok))
        if len(applied) == 1:
            raise KeyboardInterrupt("Ctrl-C")
        return outcome

    monkeypatch.setattr(manager.execution, "apply", apply)
    return applied


def test_a_refused_command_interrupted_as_its_apply_returns_is_reported_refused_once(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ADVANCE of a DORMANT seed is refused by ``apply``; Ctrl-C as ``apply`` returns: that
    refusal stands (counted failed, logged refused once, not as applied), the command is not
    taken again, and the GERMINATE behind it applies once at the next safe point."""
    manager = rig.manager
    manager.loader.original(mlp)
    applied = ctrl_c_as_the_first_apply_returns(manager, monkeypatch)
    advance, germinate = queue(
        rig,
        make_seed_command("advance", SEED1),  # SEED1 is DORMANT: refused
        make_seed_command("germinate", SEED0, mlp),
    )
    with pytest.raises(KeyboardInterrupt):
        manager.apply_pending()
    assert applied == [(advance, False)] and rig.stage(SEED1) == S.DORMANT
    assert [entry[:3] for entry in manager.command_log] == [(advance, "seed.advance", False)]
    assert len(manager.pending) == 1  # only the GERMINATE behind it
    assert_counts_add_up(rig, executed=0, failed=1)

    (outcome,) = manager.apply_pending()
    assert (outcome.command_id, outcome.ok) == (germinate, True)
    assert applied == [(advance, False), (germinate, True)]  # the ADVANCE never again
    assert [entry[:3] for entry in manager.command_log] == [
        (advance, "seed.advance", False),
        (germinate, "seed.germinate", True),
    ]
    assert_counts_add_up(rig, executed=1, failed=1)
    assert rig.stage(SEED0) == S.ISOLATED_INIT and not manager.pending


@pytest.mark.usefixtures("sigint_raises")
def test_a_second_ctrl_c_while_close_waits_leaves_the_manager_closed(rig: Rig, mlp) -> None:
    """A ``with manager:`` block's exit waits in ``close()`` for the trainer thread's step (a
    checkpoint being written); a second Ctrl-C there left the manager open, its store client
    closed, and GERMINATEs accepted that then failed. Now every later call is refused, the
    step in flight completes, and a later ``close()`` releases the run."""
    manager = rig.manager
    holding, go_on = threading.Event(), threading.Event()
    main = threading.main_thread().ident
    assert main == threading.get_ident()

    def trainer() -> None:  # holds the manager's lock as a step does, Ctrl-C sent meanwhile
        with manager._lock:
            holding.set()
            time.sleep(0.3)  # the main thread is waiting in close() by now
            signal.pthread_kill(main, signal.SIGINT)
            go_on.wait(10)

    thread = threading.Thread(target=trainer)
    thread.start()
    holding.wait(10)
    with pytest.raises(KeyboardInterrupt):
        manager.close()
    go_on.set()
    thread.join(10)
    assert manager.state.closed
    taken: list[bool] = []  # by another thread: the interrupted close() holds no lock

    def take_and_release() -> None:
        taken.append(manager._lock.acquire(timeout=5))
        if taken[-1]:
            manager._lock.release()

    other = threading.Thread(target=take_and_release)
    other.start()
    other.join(10)
    assert taken == [True]
    with pytest.raises(RuntimeError, match="closed"):
        rig.train(1)
    assert not manager.handle_adaptation_command(
        rig.signed(make_seed_command("germinate", SEED0, mlp))
    )
    assert manager.handler.stats["rejected:closed"] == 1  # refused at the door
    manager.close()  # a later close() releases the run: the same run starts again
    config = manager.config
    type(manager)(config, keyring=rig.keyring).close()


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_inside_close_still_closes_everything(rig: Rig, monkeypatch) -> None:
    """A Ctrl-C landing while ``close()`` reports its pending rejections skipped closing the
    nonce ledger: the run stayed held until ``close()`` ran again. It is delivered once all is
    closed."""
    manager = rig.manager
    calls = _ctrl_c_before(monkeypatch, manager.handler, "flush_rejections")
    with pytest.raises(KeyboardInterrupt):
        manager.close()
    assert calls
    type(manager)(manager.config, keyring=rig.keyring).close()  # the run is free


@pytest.mark.parametrize("handling", ["ignored", "recorded"])
def test_a_ctrl_c_its_handler_does_not_raise_for_leaves_close_waiting(
    rig: Rig, handling: str
) -> None:
    """A job started with SIGINT ignored, or a handler that only records it ("finish the
    epoch"): a SIGINT while ``close()`` waits out the step is that handler's, and the close
    goes on to release the run (it returned early, the ledger and run lock still held)."""
    manager = rig.manager
    seen: list[int] = []
    handler = signal.SIG_IGN if handling == "ignored" else (lambda signum, frame: seen.append(1))
    previous = signal.signal(signal.SIGINT, handler)
    holding = threading.Event()
    main = threading.get_ident()

    def trainer() -> None:
        with manager._lock:
            holding.set()
            time.sleep(0.3)
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.3)

    thread = threading.Thread(target=trainer)
    try:
        thread.start()
        holding.wait(10)
        manager.close()
    finally:
        thread.join(10)
        signal.signal(signal.SIGINT, previous)
    assert seen == ([] if handling == "ignored" else [1])
    type(manager)(manager.config, keyring=rig.keyring).close()  # the run was released
