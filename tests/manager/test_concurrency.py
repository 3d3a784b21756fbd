"""Commands and training never race (docs/design.md §5): a controller thread sends signed
commands at any time while the main thread trains; commands are verified on arrival and applied
only at the training thread's safe points."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint
from torch.nn import functional as F

import tests.manager.helpers as helpers
from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.errors import UrzaUnavailableError
from kasmina.urza.client import UrzaLibraryClient
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import SEED0, SEED1, Rig, S, host_params, make_config
from tests.urza.helpers import FlakyFS

TRAIN_SECONDS = 3.0
MAX_COMMANDS = 400


def controller(rig: Rig, artifacts: list[str], stop: threading.Event, sent: list) -> None:
    """Sends a random mix of seed commands (and a few rollbacks) as fast as it can; the last
    few are TERMINATEs so the seeds stay alive most of the run."""
    rng = random.Random(7)
    manager = rig.manager
    for i in range(MAX_COMMANDS):
        if stop.is_set():
            break
        seed_id = rng.choice([SEED0, SEED1])
        roll = rng.random()
        if i > MAX_COMMANDS * 0.95 and roll < 0.5:
            cmd = make_seed_command("terminate", seed_id)
        elif roll < 0.35:
            cmd = make_seed_command("germinate", seed_id, rng.choice(artifacts))
        elif roll < 0.75:
            cmd = make_seed_command("advance", seed_id)
        elif roll < 0.97:
            cmd = make_seed_command("cull", seed_id, parameters={"embargo_epochs": 0.0})
        else:
            cmd = make_rollback_command(0)
        sent.append(manager.handle_adaptation_command(rig.signed(cmd)))
        time.sleep(rng.random() * 0.004)


def test_a_controller_thread_never_breaks_the_trainer(
    tmp_path: Path, store: Path, keyring: Keyring, published
) -> None:
    _, mlp, affine = published
    rig = Rig(make_config(tmp_path, store, max_pending_commands=64), keyring)
    manager = rig.manager
    rig.train(1)
    manager.end_epoch(0)  # a checkpoint for the rollbacks to reach
    stop = threading.Event()
    sent: list[bool] = []
    thread = threading.Thread(target=controller, args=(rig, [mlp, affine], stop, sent))
    thread.start()
    steps = epochs = 0
    started = time.monotonic()
    try:
        # Any exception here fails the test: the trainer must never see one.
        # At least TRAIN_SECONDS, and on a loaded machine on until enough happened to judge
        # (bounded: four times that at most).
        while thread.is_alive() and (
            time.monotonic() - started < TRAIN_SECONDS
            or (steps <= 10 or sum(sent) <= 20)
            and time.monotonic() - started < 4 * TRAIN_SECONDS
        ):
            loss = F.cross_entropy(rig.model(rig.x), rig.y)
            manager.backward(loss, kd_loss=manager.collect_kd_losses())
            manager.step()
            steps += 1
            if steps % 10 == 0:
                epochs += 1
                manager.end_epoch(epochs)
                # G5's evidence, measured at the boundary while commands keep arriving.
                manager.evaluate_seeds([(rig.x, rig.y)], loss_fn=F.cross_entropy)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
    manager.apply_pending(wait=True)
    stats = manager.handler.stats
    assert steps > 10 and sum(sent) > 20
    # Every accepted command was queued (or dropped on a full queue) and then applied or
    # refused exactly once, at a safe point.
    dropped = sum(1 for entry in manager.command_log if entry[3].startswith("command queue full"))
    assert stats["accepted"] == sum(sent) + dropped
    assert stats["executed"] + stats["failed"] == stats["accepted"]
    assert len(manager.pending) == 0
    kinds = {(kind, ok) for _, kind, ok, _ in manager.command_log}
    assert ("seed.germinate", True) in kinds and ("seed.cull", True) in kinds
    assert all(torch.isfinite(p).all() for p in host_params(rig))
    assert torch.isfinite(rig.model(rig.x)).all()


def test_commands_wait_for_the_safe_point(rig: Rig, mlp) -> None:
    """A command accepted mid-step changes nothing until the step's end; then it applies."""
    manager = rig.manager
    manager.loader.original(mlp)  # cached: nothing to fetch
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("germinate", SEED0, mlp)))
    assert rig.stage(SEED0) == S.DORMANT and len(manager.pending) == 1
    manager.backward(loss)
    report = manager.step()
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert [(o.target, o.ok) for o in report["commands"]] == [(SEED0, True)]
    assert manager.command_log[-1][1:3] == ("seed.germinate", True)
    assert manager.handler.stats["executed"] == 1


def test_apply_pending_between_a_forward_and_its_backward_applies_nothing(
    rig: Rig, mlp, caplog
) -> None:
    """A CULL applied there released a kernel the forward's graph still used: the backward
    raised on its emptied parameters (an ACTIVE seed's, a GRAFTING seed's through its guard).
    Until the step's end an explicit safe point now applies nothing; the step applies it."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    rig.train(2)
    manager.end_epoch(0)
    assert rig.send("advance", SEED0) and rig.send("advance", SEED1)  # COMPATIBILITY_CHECK
    rig.train(1)
    assert rig.send("advance", SEED0) and rig.stage(SEED0) == S.GRAFTING
    for seed_id in (SEED0, SEED1):
        raw = rig.signed(make_seed_command("cull", seed_id))
        loss = F.cross_entropy(rig.model(rig.x), rig.y)  # the graph runs through the kernel
        assert manager.handle_adaptation_command(raw)
        assert manager.apply_pending(wait=True) == [] and len(manager.pending) == 1
        assert rig.stage(seed_id) != S.COOLDOWN
        manager.backward(loss)
        report = manager.step()
        assert report["host_stepped"] and [(o.target, o.ok) for o in report["commands"]] == [
            (seed_id, True)
        ]
        assert rig.stage(seed_id) == S.COOLDOWN
    assert "nothing applied, the commands wait for step()" in caplog.text
    with torch.no_grad():  # a forward without a graph leaves the safe point open
        rig.model(rig.x)
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
    assert len(manager.apply_pending()) == 1  # (refused: a seed in COOLDOWN)


class ReentrantHost(helpers.Host):
    """The rig's host with the slot under a reentrant activation checkpoint: its forward runs
    under ``no_grad``, and its backward runs the slot (and the seed's kernel) again."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return torch.utils.checkpoint.checkpoint(self.out, h, use_reentrant=True)


class KeywordReentrantHost(helpers.Host):
    """As ``ReentrantHost``, the slot called by keyword (Hugging Face calls its attention
    ``self_attn(hidden_states=...)``): the mark looked at positional inputs only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return torch.utils.checkpoint.checkpoint(lambda h: self.out(input=h), h, use_reentrant=True)


class DeepReentrantHost(helpers.Host):
    """The whole host under a reentrant checkpoint (a PEFT recipe's, inputs made to need grad):
    the slot is not at the region's entry, so its input is a host activation made under
    ``no_grad`` that needs no grad, and the mark read from the inputs saw nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = lambda h: self.out(torch.relu(self.inp(h)))  # noqa: E731
        return torch.utils.checkpoint.checkpoint(
            region, x.detach().requires_grad_(), use_reentrant=True
        )


HOSTS = [ReentrantHost, KeywordReentrantHost, DeepReentrantHost]


@pytest.mark.parametrize("host", HOSTS, ids=["args", "kwargs", "deep"])
def test_a_reentrant_checkpoints_forward_marks_the_graph_too(
    tmp_path: Path, store: Path, keyring: Keyring, mlp, monkeypatch, host
) -> None:
    monkeypatch.setattr(helpers, "Host", host)
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    loss = F.cross_entropy(rig.model(rig.x), rig.y)  # the slot ran under no_grad
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
    assert manager.apply_pending() == [] and rig.stage(SEED0) == S.ISOLATED_INIT
    manager.backward(loss)  # the recompute runs the kernel the CULL would have released
    assert [o.ok for o in manager.step()["commands"]] == [True]
    assert rig.stage(SEED0) == S.COOLDOWN


def test_a_rollback_waits_for_the_step_of_a_forward_deep_in_a_reentrant_checkpoint(
    tmp_path: Path, store: Path, keyring: Keyring, mlp, monkeypatch
) -> None:
    """Applied between the forward and its backward, the ROLLBACK restored the weights and the
    step then applied the old forward's gradients to them. It waits for the step's end now; a
    validation forward under ``no_grad`` through the same checkpoint leaves no mark."""
    monkeypatch.setattr(helpers, "Host", DeepReentrantHost)
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    saved = host_params(rig)
    rig.train(2)
    with torch.no_grad():
        rig.model(rig.x)
    assert not manager.require_registry().graph_open()
    trained = host_params(rig)
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    assert manager.require_registry().graph_open()
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    assert manager.apply_pending() == []
    for now, old, then in zip(host_params(rig), saved, trained, strict=True):
        assert torch.equal(now, then) and not torch.equal(now, old)  # not restored yet
    manager.backward(loss)
    report = manager.step()
    assert [(o.kind, o.ok) for o in report["commands"]] == [("rollback", True)]
    assert all(torch.equal(now, old) for now, old in zip(host_params(rig), saved, strict=True))


def test_a_validation_forward_in_train_mode_under_no_grad_leaves_no_mark(rig: Rig, mlp) -> None:
    """No graph, none to come: the epoch's commands apply at ``end_epoch`` (a training-mode
    forward used to mark the slot whatever the grad mode, and the demo's validation, in train
    mode under ``no_grad``, left 26 of its 40 epoch ends applying nothing)."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    assert rig.model.training
    with torch.no_grad():
        rig.model(rig.x)
    assert not manager.require_registry().graph_open()
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
    manager.end_epoch(0)
    assert len(manager.pending) == 0 and rig.stage(SEED0) != S.ISOLATED_INIT


class InputMarkingHost(helpers.Host):
    """Wav2Vec2's feature encoder: in training it sets ``requires_grad`` on its first
    convolution's input (for its gradient checkpointing), under ``no_grad`` too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        if self.training and not h.requires_grad:  # no graph: a leaf it may mark
            h.requires_grad = True
        return self.out(h)


def test_a_no_grad_forward_of_a_host_that_marks_the_slots_input_leaves_no_mark(
    tmp_path: Path, store: Path, keyring: Keyring, mlp, monkeypatch
) -> None:
    """The slot met under ``no_grad`` an input needing grad that no reentrant checkpoint made
    (the model marked it) and took the call for a checkpoint's first run: the commands sent
    after a recording forward, or a validation forward in train mode, waited for the next
    step's end (``end_epoch`` applied none). Only a call inside an autograd Function's forward
    (forward-mode AD is off there) is one now; the reentrant hosts above still mark the graph."""
    monkeypatch.setattr(helpers, "Host", InputMarkingHost)
    rig = Rig(make_config(tmp_path, store), keyring, record=False)
    assert rig.model.training
    with torch.no_grad():
        rig.model(rig.x)
    assert not rig.manager.require_registry().graph_open()
    assert rig.send("germinate", SEED0, mlp) and rig.stage(SEED0) == S.ISOLATED_INIT
    rig.train(1)
    with torch.no_grad():
        rig.model(rig.x)
    assert rig.manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
    rig.manager.end_epoch(0)
    assert len(rig.manager.pending) == 0 and rig.stage(SEED0) == S.RECYCLING  # embargo over


def test_end_epoch_after_a_forward_through_a_kernel_leaves_the_commands_to_the_step(
    rig: Rig, mlp
) -> None:
    """The last micro-batch of an epoch went forward (and maybe backward) before
    ``end_epoch``, its step to come: a ROLLBACK applied there rewrote the weights under the
    live graph (its backward raised) or left that graph's gradients for the step to apply to
    the restored weights. The epoch ends; the command waits for the step's end."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    rig.train(2)
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    manager.end_epoch(1)
    assert manager.epoch == 1 and len(manager.pending) == 1  # ended, the rollback waiting
    manager.backward(loss)
    report = manager.step()
    assert [(o.kind, o.ok) for o in report["commands"]] == [("rollback", True)]
    assert manager.epoch == 0


def test_a_forward_through_dormant_slots_marks_the_graph_too(rig: Rig) -> None:
    """With every seed DORMANT the slot's forward marked nothing: a ROLLBACK applied at
    ``end_epoch`` (or ``apply_pending``) between the last micro-batch's forward and its
    backward rewrote the host weights that graph saved, and the backward raised out of the
    host's step. The command now waits for the step's end, as with a kernel in the graph."""
    manager = rig.manager
    rig.train(2)
    manager.end_epoch(0)
    rig.train(2)
    loss = F.cross_entropy(rig.model(rig.x), rig.y)
    assert manager.require_registry().graph_open()
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    manager.end_epoch(1)
    assert manager.apply_pending(wait=True) == [] and len(manager.pending) == 1
    manager.backward(loss)
    report = manager.step()
    assert [(o.kind, o.ok) for o in report["commands"]] == [("rollback", True)]
    assert manager.epoch == 0


def test_a_forward_with_grad_that_records_no_graph_leaves_no_mark(rig: Rig) -> None:
    """Grad mode on, but nothing requires a gradient (a frozen model, an attribution pass's
    setup): no graph, none to come; the commands apply at the explicit safe point."""
    rig.model.requires_grad_(False)
    rig.model(rig.x)
    assert not rig.manager.require_registry().graph_open()
    rig.model.requires_grad_(True)
    rig.model(rig.x)
    assert rig.manager.require_registry().graph_open()


def test_a_rollback_drops_the_gradients_of_the_timeline_it_leaves(rig: Rig) -> None:
    """Gradients accumulated before a rollback at a safe point (a backward through no slot,
    so no graph mark) were computed on the abandoned weights: the next step applied them to
    the restored ones. The checkpoint holds none, and neither does the model after it."""
    manager = rig.manager
    rig.train(1)
    manager.end_epoch(0)
    saved = host_params(rig)
    rig.train(2)
    manager.backward(rig.model.inp(rig.x).square().mean())  # not stepped; the slot not run
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    assert [o.ok for o in manager.apply_pending()] == [True]
    assert all(p.grad is None for p in rig.model.parameters())
    manager.step()  # nothing to apply
    assert all(torch.equal(a, b) for a, b in zip(saved, host_params(rig), strict=True))


def test_a_refused_command_is_reported_with_its_reason(rig: Rig) -> None:
    manager = rig.manager
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED1)))
    (outcome,) = manager.apply_pending()
    assert not outcome.ok and "cannot be culled from DORMANT" in outcome.reason
    assert manager.handler.stats["failed"] == 1
    events = rig.sink.events("command.complete")
    assert events and events[-1].labels["success"] == "false"


def test_the_queue_is_bounded(tmp_path: Path, store: Path, keyring: Keyring, caplog) -> None:
    """A full queue refuses each command (counted, reported); a flood of them is logged once
    and then every 1,000th, not a warning per command."""
    rig = Rig(make_config(tmp_path, store, max_pending_commands=2), keyring)
    manager = rig.manager
    caplog.set_level("WARNING", logger="kasmina.manager.intake")
    results = [
        manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
        for _ in range(12)
    ]
    assert results == [True, True] + [False] * 10
    assert len(manager.pending) == 2 and manager.handler.stats["failed"] == 10
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    assert len(manager.apply_pending()) == 2 and len(manager.pending) == 0


def slow_store_rig(tmp_path: Path, store: Path, keyring: Keyring) -> Rig:
    """A rig whose store answers every read after 0.5 s: a fetch is still running at the next
    safe point."""
    config = make_config(tmp_path, store)
    urza = UrzaLibraryClient.from_config(config)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.delay_s = 0.5
    return Rig(config, keyring, urza_client=urza)


def test_later_commands_for_the_same_seed_wait_behind_a_fetch(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """While a GERMINATE's kernel is fetched, a CULL of that seed waits behind it; a command
    for the other seed goes ahead."""
    rig = slow_store_rig(tmp_path, store, keyring)
    manager = rig.manager
    for cmd in (
        make_seed_command("germinate", SEED0, mlp),
        make_seed_command("cull", SEED0),
        make_seed_command("cull", SEED1),
    ):
        assert manager.handle_adaptation_command(rig.signed(cmd))
    first = manager.apply_pending()  # the fetch is still running: only SEED1's command
    assert [o.target for o in first] == [SEED1] and len(manager.pending) == 2
    rest = manager.apply_pending(wait=True)
    assert [(o.target, o.ok) for o in rest] == [(SEED0, True), (SEED0, True)]
    assert rig.stage(SEED0) == S.COOLDOWN
    assert torch.isfinite(rig.model(rig.x)).all()


def test_two_safe_points_at_once_apply_each_command_once(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """A thread waiting in ``apply_pending(wait=True)`` for a fetch and the training thread's
    own safe point never both take a command: the safe point that finds another thread
    applying returns at once (without waiting for the fetch), and that thread applies each
    queued command once, in order."""
    rig = slow_store_rig(tmp_path, store, keyring)
    manager = rig.manager
    commands = [
        make_seed_command("germinate", SEED0, mlp),
        make_seed_command("cull", SEED1),
        make_seed_command("cull", SEED1),
    ]
    for cmd in commands:
        assert manager.handle_adaptation_command(rig.signed(cmd))
    waited: list = []
    other = threading.Thread(target=lambda: waited.extend(manager.apply_pending(wait=True)))
    other.start()
    deadline = time.monotonic() + 10
    while not manager.intake._applying.locked():  # the other thread holds the safe point
        assert time.monotonic() < deadline
        time.sleep(0.005)
    mine = manager.apply_pending()
    assert mine == []  # it returned at once: the other thread applies what is ready
    rig.train(1)  # a step's safe point does not wait either
    other.join(timeout=30)
    assert not other.is_alive()
    applied = [o.command_id for o in waited]
    assert sorted(applied) == sorted(c.command_id for c in commands)
    assert [entry[0] for entry in manager.command_log] == applied
    stats = manager.handler.stats
    assert stats["executed"] + stats["failed"] == stats["accepted"] == 3
    assert rig.stage(SEED0) == S.ISOLATED_INIT and len(manager.pending) == 0


def test_a_germinate_that_must_fetch_applies_at_a_later_step(rig: Rig, mlp) -> None:
    """The step never waits for the store: the fetch runs on a worker, and the command is
    applied at the first safe point after it finished."""
    manager = rig.manager
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("germinate", SEED0, mlp)))
    deadline = time.monotonic() + 30
    while rig.stage(SEED0) == S.DORMANT and time.monotonic() < deadline:
        rig.train(1)
        time.sleep(0.01)
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    assert manager.command_log[-1][1:3] == ("seed.germinate", True)


def test_commands_apply_only_once_their_nonces_are_durable(rig: Rig, mlp, monkeypatch) -> None:
    manager = rig.manager
    manager.loader.original(mlp)
    verifier = manager.verifier
    real = verifier.make_durable
    synced: list[int] = []

    def counting() -> None:
        synced.append(len(manager.pending))
        real()

    monkeypatch.setattr(verifier, "make_durable", counting)
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("germinate", SEED0, mlp)))
    assert synced == []  # arrival only writes the nonce
    assert [o.ok for o in manager.apply_pending()] == [True]
    assert len(synced) == 1

    def failing() -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(verifier, "make_durable", failing)
    cull = make_seed_command("cull", SEED0)
    first = rig.signed(cull)
    assert manager.handle_adaptation_command(first)
    (outcome,) = manager.apply_pending()
    assert not outcome.ok and "could not be made durable" in outcome.reason
    assert outcome.target == SEED0  # named, as an executor's refusal names it
    assert rig.stage(SEED0) == S.ISOLATED_INIT

    # The disk back: the controller's retry (its id, signed anew) applies, as the refusal
    # never acted; the refused message itself is still a replay.
    monkeypatch.setattr(verifier, "make_durable", real)
    assert not manager.handle_adaptation_command(first)
    assert manager.handle_adaptation_command(rig.signed(cull))
    (outcome,) = manager.apply_pending()
    assert outcome.ok and outcome.command_id == cull.command_id
    assert rig.stage(SEED0) == S.COOLDOWN


def test_a_queued_command_refused_for_the_ledger_keeps_its_retry(rig: Rig, mlp) -> None:
    """A GERMINATE waits for its kernel while another command's safe point makes its nonce
    durable; at its own safe point the ledger fails (another nonce), and it is refused without
    having acted. Its id is freed for the controller's retry (the id's acceptance is its
    own), though its nonce was already on disk."""
    manager, gate = rig.manager, threading.Event()
    fetch = manager.urza_client.fetch

    def held_fetch(artifact_id: str, **kwargs: object) -> object:
        assert gate.wait(60)
        return fetch(artifact_id, **kwargs)

    manager.urza_client.fetch = held_fetch
    germinate = make_seed_command("germinate", SEED1, mlp)
    assert manager.handle_adaptation_command(rig.signed(germinate))
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("terminate", SEED0)))
    assert [o.target for o in manager.apply_pending()] == [SEED0]  # its nonce durable too
    verifier = manager.verifier
    real = verifier.make_durable

    def failing() -> None:
        raise OSError(28, "No space left on device")

    verifier.make_durable = failing  # type: ignore[method-assign]
    gate.set()
    (outcome,) = manager.apply_pending(wait=True)
    assert not outcome.ok and "could not be made durable" in outcome.reason
    verifier.make_durable = real  # type: ignore[method-assign]
    assert manager.handle_adaptation_command(rig.signed(germinate))  # the retry
    assert [o.ok for o in manager.apply_pending(wait=True)] == [True]
    assert rig.stage(SEED1) == S.ISOLATED_INIT


def test_close_during_a_waiting_safe_point_reports_each_command_once(
    tmp_path: Path, store: Path, keyring: Keyring, published, monkeypatch
) -> None:
    """``close()`` on one thread while another waits in ``apply_pending(wait=True)`` for a
    fetch: the close refuses both queued GERMINATEs (one's fetch running, the other's not yet
    started, so cancelled), and the waiting safe point neither raises nor reports either again.
    """
    _, mlp, affine = published
    rig = Rig(make_config(tmp_path, store, fetch_workers=1), keyring)
    manager = rig.manager
    release = threading.Event()

    def blocked_fetch(artifact_id: str, deadline: float | None = None):
        release.wait(30)  # until the close has happened
        raise UrzaUnavailableError(f"{artifact_id}: store closed")

    monkeypatch.setattr(manager.loader, "original", blocked_fetch)
    waiting = threading.Event()  # the safe point polls the queued fetches (past its snapshot)
    clock = manager.pending._clock

    def watched_clock() -> float:
        if threading.current_thread() is not threading.main_thread():
            waiting.set()
        return clock()

    monkeypatch.setattr(manager.pending, "_clock", watched_clock)
    for seed_id, artifact_id in ((SEED0, mlp), (SEED1, affine)):
        cmd = make_seed_command("germinate", seed_id, artifact_id, timeout_s=60.0)
        assert manager.handle_adaptation_command(rig.signed(cmd))
    result: dict = {}

    def safe_point() -> None:
        try:
            result["outcomes"] = manager.apply_pending(wait=True)
        except BaseException as exc:  # recorded: the test fails on it below
            result["raised"] = exc

    other = threading.Thread(target=safe_point)
    other.start()
    try:
        assert waiting.wait(30)
        manager.close()
    finally:
        release.set()
        other.join(timeout=30)
    assert not other.is_alive()
    assert result == {"outcomes": []}
    stats = manager.handler.stats
    assert (stats["accepted"], stats["executed"], stats["failed"]) == (2, 0, 2)
    assert [entry[2:] for entry in manager.command_log] == [
        (False, "manager closed before it applied")
    ] * 2
    assert len(manager.pending) == 0


def _close_from_another_thread_while(target, name: str, rig: Rig) -> threading.Thread:
    """Patch ``target.name`` to pause once it has run, and close the manager from another
    thread during that pause: without the manager's lock, close() ran in the middle."""
    original = getattr(target, name)
    inside = threading.Event()

    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        inside.set()
        time.sleep(0.3)  # close() is called now, and must wait for the rest
        return result

    setattr(target, name, paused)
    closer = threading.Thread(target=lambda: (inside.wait(10.0), rig.manager.close()))
    closer.start()
    return closer


def test_close_from_another_thread_waits_for_a_rollback_to_commit(rig: Rig, mlp, monkeypatch):
    """A watchdog (or a ``with`` block's exit after a Ctrl-C while a trainer thread runs)
    closed the manager inside a ROLLBACK's commit: reported refused, it was half done (the
    weights and clock rolled back, the seed's kernel attached without its record or pin)."""
    from kasmina.manager import rollback

    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0, embargo_epochs=0.0)
    rig.train(2)
    monkeypatch.setattr(rollback, "_new_monitors", rollback._new_monitors)
    closer = _close_from_another_thread_while(rollback, "_new_monitors", rig)
    assert manager.handle_adaptation_command(rig.signed(make_rollback_command(0)))
    (outcome,) = rig.train(1)["commands"]
    closer.join(10.0)
    assert outcome.ok, outcome.reason
    assert manager.state.closed and manager.epoch == 0
    record = manager.require_registry()[SEED0]
    seed = manager.seed(SEED0)
    assert seed.kernel is not None and record.kernel is seed.kernel and record.pinned
    assert not seed.kernel._forward_hooks  # unhooked by the close that followed


def test_close_from_another_thread_waits_for_a_germinate(rig: Rig, mlp, monkeypatch):
    """Closed inside a GERMINATE, the command went on: the closed manager's hook stayed on the
    kernel (recording every later forward's output) with a monitor and a pin made after it."""
    from kasmina.manager import executor

    manager = rig.manager
    manager.loader.original(mlp)  # cached: the command applies at once
    monkeypatch.setattr(executor.CommandExecution, "_dry_run", executor.CommandExecution._dry_run)
    closer = _close_from_another_thread_while(executor.CommandExecution, "_dry_run", rig)
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("germinate", SEED0, mlp)))
    (outcome,) = rig.train(1)["commands"]
    closer.join(10.0)
    assert outcome.ok and manager.state.closed
    kernel = manager.seed(SEED0).kernel
    assert kernel is not None and not kernel._forward_hooks
    rig.model(rig.x)
    assert (
        manager.require_registry()[SEED0].last_output is None
    )  # the closed manager records nothing


def test_a_teacher_loaded_on_another_thread_is_swapped_in_between_commands(
    rig: Rig, mlp, monkeypatch
):
    """``load_teacher`` swapped the teacher and the optimizers' teacher source without the
    manager's lock, in the middle of a command a safe point was applying."""
    from kasmina.manager import executor

    manager = rig.manager
    manager.loader.original(mlp)
    original, times = executor.CommandExecution._dry_run, {}
    inside = threading.Event()

    def paused(*args, **kwargs):
        result = original(*args, **kwargs)
        inside.set()
        time.sleep(0.3)
        times["command"] = time.monotonic()
        return result

    monkeypatch.setattr(executor.CommandExecution, "_dry_run", paused)

    def load() -> None:
        inside.wait(10.0)
        manager.load_teacher(torch.nn.Linear(6, 4))
        times["teacher"] = time.monotonic()

    loader = threading.Thread(target=load)
    loader.start()
    assert manager.handle_adaptation_command(rig.signed(make_seed_command("germinate", SEED0, mlp)))
    (outcome,) = rig.train(1)["commands"]
    loader.join(10.0)
    assert outcome.ok and manager.teacher is not None
    assert times["teacher"] >= times["command"]


def test_an_epoch_end_a_close_overtakes_writes_nothing(rig: Rig, monkeypatch) -> None:
    """``end_epoch`` opens the store and applies the queued commands before it takes the lock;
    a ``close()`` on another thread in between then released the run lock, and the epoch's
    checkpoint was still written into the closed store, its clock ticked."""
    manager = rig.manager
    rig.train(1)
    manager.end_epoch(0)
    apply_pending = manager.intake.apply_pending

    def closed_meanwhile(**kwargs):
        closer = threading.Thread(target=manager.close)
        closer.start()
        closer.join(10.0)
        return apply_pending(**kwargs)

    rig.train(1)
    monkeypatch.setattr(manager.intake, "apply_pending", closed_meanwhile)
    with pytest.raises(RuntimeError, match="closed"):
        manager.end_epoch(1)
    assert manager.epoch == 0
    written = sorted(p.name for p in Path(manager.config.checkpoint_dir).glob("*.ckpt"))
    assert len(written) == 1 and "epoch_00000000" in written[0]


@pytest.mark.parametrize("ranks", ["one", "coordinated"])
def test_a_commands_log_entry_is_there_when_its_complete_event_arrives(
    tmp_path: Path, store: Path, keyring: Keyring, ranks: str
) -> None:
    """A controller's sink that reads ``command_log`` when ``command.complete`` arrives found no
    entry for a command refused at the queue (full) or dropped by ``close()``: those posted the
    event first. Every refusal is logged before its event now, as an applied command is, the
    multi-rank coordinator's too (``ManagerApplier.refuse``)."""
    from kasmina.manager.ddp import DistributedKasmina

    rig = Rig(make_config(tmp_path, store, max_pending_commands=1), keyring)
    manager, seen = rig.manager, []
    if ranks == "coordinated":
        DistributedKasmina(manager, max_pending=1)

    class Controller:
        def send(self, packet) -> None:
            for metric in packet.metrics:
                if metric.name == "command.complete":
                    cid = metric.labels["command_id"]
                    logged = [entry for entry in manager.command_log if entry[0] == cid]
                    seen.append((cid, logged[-1][3] if logged else None))

    manager.telemetry.add_sink(Controller())
    first = make_seed_command("terminate", SEED1, command_id="queued")
    full = make_seed_command("terminate", SEED0, command_id="full")
    assert manager.handle_adaptation_command(rig.signed(first))
    assert not manager.handle_adaptation_command(rig.signed(full))
    manager.close()
    assert dict(seen) == {
        "full": {
            "one": "command queue full (1 pending) or closed",
            "coordinated": "the coordinator's queue is full",
        }[ranks],
        "queued": "manager closed before it applied",
    }


def test_a_sink_that_reads_the_manager_on_a_kernel_load_holds_no_command_up(
    tmp_path: Path, store: Path, keyring: Keyring, mlp
) -> None:
    """A safe point's GERMINATE loads its kernel under the manager's lock, joining the load a
    queued GERMINATE's fetch-ahead started. That load told the sinks (``kernel.load_ms``)
    before its waiters had the kernel, and a sink that reads the manager (``system_state``,
    an any-thread read) waited for the lock: the command waited out its whole timeout and was
    refused. The sinks hear of a load once its waiters have it."""
    from kasmina.control.commands import to_kasmina_command

    rig = slow_store_rig(tmp_path, store, keyring)
    manager = rig.manager
    seen: list[dict] = []

    class StateOnLoad:
        def send(self, packet) -> None:
            if any(metric.name == "kernel.load_ms" for metric in packet.metrics):
                seen.append(manager.system_state())

    manager.telemetry.add_sink(StateOnLoad())
    queued = make_seed_command("germinate", SEED1, mlp, timeout_s=5.0)
    assert manager.handle_adaptation_command(rig.signed(queued))  # its fetch starts at once
    time.sleep(0.05)
    command = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=5.0))
    assert manager.execute(command), manager.command_log[-1]
    assert [(o.target, o.ok) for o in manager.apply_pending(wait=True)] == [(SEED1, True)]
    assert seen and rig.stage(SEED0) == rig.stage(SEED1) == S.ISOLATED_INIT
    manager.close()


def test_execute_raises_when_a_close_on_another_thread_overtakes_it(rig: Rig, mlp) -> None:
    """``execute`` checked that the manager was open before it took the lock, and a close() on
    another thread (a watchdog) that took it meanwhile (while the nonce was made durable) left
    the command to run on the closed manager: a GERMINATE hooked a kernel into the model the
    close had let go of. It raises, as on any closed manager, having changed nothing."""
    from kasmina.control.commands import to_kasmina_command

    manager = rig.manager
    manager.loader.original(mlp)  # cached: nothing to fetch
    durable = manager.verifier.make_durable
    closer = threading.Thread(target=manager.close)

    def overtaken() -> None:  # a slow fdatasync, during which the watchdog closes
        durable()
        if threading.current_thread() is not closer:  # (the close makes its own durable too)
            closer.start()
            closer.join(10.0)

    manager.verifier.make_durable = overtaken  # type: ignore[method-assign]
    command = to_kasmina_command(make_seed_command("germinate", SEED0, mlp))
    with pytest.raises(RuntimeError, match="closed"):
        manager.execute(command)
    assert command.command_id not in manager.verifier._ids  # free for a retry: it never acted
    record = manager.registry[SEED0]
    assert record.seed.kernel is None and record.hook is None and rig.stage(SEED0) == S.DORMANT
