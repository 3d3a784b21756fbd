"""KasminaKernelManager's ROLLBACK end to end: weights, optimizer states, seed states and layout
restored bit for bit from an epoch's checkpoint, the epoch boundary replayed, the originals of
live seeds pinned; a rollback refused or failing at any point changes nothing (or, past its
commit, is applied and says so); the isolation-violation counter it never lowers. A real Urza
store, the real handler, a tiny host on CPU (and on CUDA where there is one)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from kasmina.control.builders import make_rollback_command
from kasmina.leyline import MetricType
from kasmina.manager import rollback as rollback_module
from kasmina.seeds.extra_state import decode_extra_state, encode_extra_state
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import StateColumn
from kasmina.utils.state_io import clone_state
from tests.manager.helpers import (
    SEED0,
    SEED1,
    Rig,
    S,
    _fail_once,
    _live,
    assert_same,
    loads_changed,
    make_config,
    run_command,
    snapshot_state,
    through_a_seed,
    walk_to_active,
)


def test_rollback_restores_weights_states_and_layout_bit_for_bit(rig: Rig, mlp, published) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(3)
    manager.end_epoch(0)
    saved = snapshot_state(rig)
    stages = manager.stages()
    # Diverge: SEED0 graduates to ACTIVE (promoted), SEED1 takes another artifact, then is culled.
    assert rig.send("germinate", SEED1, published[2])
    walk_to_active(rig, [SEED0], epoch=1)
    assert rig.send("cull", SEED1)
    rig.train(2)
    manager.end_epoch(2)
    rollback = make_rollback_command(0, reason="test")
    rig.sink.packets.clear()
    assert run_command(manager, rig.signed(rollback))
    assert manager.stages() == stages and manager.epoch == 0
    moves = {  # the stages the rollback changed, reported as transitions
        (e.labels["seed_index"], e.labels["from"], e.labels["to"])
        for p in rig.sink.packets
        for e in p.metrics
        if e.name == "lifecycle.transition" and e.labels.get("cause") == "rollback"
    }
    index = {seed_id: str(manager.require_registry()[seed_id].index) for seed_id in (SEED0, SEED1)}
    assert moves == {
        (index[SEED0], "ACTIVE", "ISOLATED_INIT"),
        (index[SEED1], "RECYCLING", "DORMANT"),
    }
    assert_same(saved[0], clone_state(rig.model.state_dict()))
    assert_same(saved[1], clone_state(manager.optimizers.state_dict()))
    assert_same(saved[2], rig.slot.state_table.state_tensor)
    assert manager.optimizers.seed_ids == [SEED0] and manager.kernel_cache.is_pinned(mlp)
    assert manager.seed(SEED1).kernel is None
    assert manager.require_registry()[SEED0].timeline[-1] == (0, 3, "ISOLATED_INIT")
    assert rig.train(1)["seeds_stepped"] == [SEED0]  # training goes on from the checkpoint
    assert not run_command(manager, rig.signed(make_rollback_command(7)))


def test_a_rollback_that_cannot_complete_changes_nothing(rig: Rig, store: Path, mlp) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0)
    rig.train(1)
    manager.end_epoch(1)
    assert manager.evict_kernel(mlp)  # unpinned once culled: evictable
    for path in store.iterdir():
        path.unlink()  # the artifact the checkpoint needs is gone from the store
    saved = snapshot_state(rig)
    stages = manager.stages()
    assert not run_command(manager, rig.signed(make_rollback_command(0)))
    assert "ArtifactNotFoundError" in manager.command_log[-1][3]
    assert manager.stages() == stages and manager.epoch == 1
    assert_same(saved[0], clone_state(rig.model.state_dict()))
    assert_same(saved[1], clone_state(manager.optimizers.state_dict()))
    assert rig.train(1)["host_stepped"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lifecycle_and_rollback_on_cuda(tmp_path, store, keyring, mlp) -> None:
    rig = Rig(make_config(tmp_path, store, device="cuda"), keyring, device="cuda")
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp) and rig.send("germinate", SEED1, mlp)
    assert manager.kernel_cache.get(mlp).device.type == "cuda"
    rig.train(2)
    manager.end_epoch(5)
    saved = snapshot_state(rig)
    walk_to_active(rig, [SEED0, SEED1], epoch=6)
    assert manager.guard.violating_steps == 0
    assert run_command(manager, rig.signed(make_rollback_command(5)))
    assert_same(saved[0], clone_state(rig.model.state_dict()))
    assert_same(saved[1], clone_state(manager.optimizers.state_dict()))
    assert_same(saved[2], rig.slot.state_table.state_tensor)
    assert rig.train(1)["seeds_stepped"] == [SEED0, SEED1]


def test_a_rollback_replays_the_epoch_boundary_of_its_checkpoint(rig: Rig, mlp) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    assert rig.send("cull", SEED0, embargo_epochs=1)
    manager.end_epoch(0)  # the checkpoint is written before this boundary's tick
    after = _live(rig)
    manager.end_epoch(1)
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert_same(after, _live(rig))


@pytest.mark.parametrize("where", ["optimizer_state", "weights_written"])
def test_a_rollback_failing_late_changes_nothing(
    rig: Rig, mlp, published, monkeypatch, where: str
) -> None:
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0)  # diverge: other kernels, optimizers, stages
    assert rig.send("germinate", SEED1, published[2])
    rig.train(2)
    manager.end_epoch(1)
    before = _live(rig)
    if where == "optimizer_state":

        def failing_load(self, state):
            raise ValueError("optimizer state does not load")

        monkeypatch.setattr(type(manager.optimizers), "load_state_dict", failing_load)
    else:  # the weights are written, then the write fails: they must be put back
        real, calls = rig.model.load_state_dict, []

        def failing_write(state_dict, strict=True):
            result = real(state_dict, strict=strict)
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("device lost mid-restore")
            return result

        monkeypatch.setattr(rig.model, "load_state_dict", failing_write)
    assert not run_command(manager, rig.signed(make_rollback_command(0)))
    monkeypatch.undo()
    assert_same(before, _live(rig))
    kernel = manager.seed(SEED1).kernel
    assert kernel is not None and not kernel.released and manager.seed(SEED0).kernel is None
    assert rig.train(1)["seeds_stepped"] == [SEED1]
    assert run_command(manager, rig.signed(make_rollback_command(0)))  # now it can


def _diverge_after_epoch_0(rig: Rig, mlp: str, published: list[str]) -> None:
    """A checkpoint of epoch 0 with SEED0 grown, then a timeline a rollback must swap kernels
    back from: SEED0 culled, SEED1 germinated and trained."""
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    rig.manager.end_epoch(0)
    assert rig.send("cull", SEED0)
    assert rig.send("germinate", SEED1, published[2])
    rig.train(2)


def test_a_rollback_refused_for_a_seeds_state_says_so_and_changes_nothing(
    rig: Rig, mlp, published, monkeypatch
) -> None:
    """A checkpoint whose seed state this version cannot read (a newer Kasmina's extra state)
    is refused before anything is written, for the reason that it is: with kernels to swap
    back, the undo of a half-written restore used to fail on the swapped seeds and report its
    own error (another seed, another cause) instead."""
    manager = rig.manager
    _diverge_after_epoch_0(rig, mlp, published)
    manager.end_epoch(1)
    before = _live(rig)

    def from_a_newer_kasmina(checkpoint: dict) -> None:
        weights = checkpoint["modules"]["model"]
        key = next(k for k in weights if k.endswith("seeds.0._extra_state"))
        newer = {**decode_extra_state(weights[key]), "version": 2}
        weights[key] = encode_extra_state(newer)

    loads_changed(manager, monkeypatch, from_a_newer_kasmina)
    assert not run_command(manager, rig.signed(make_rollback_command(0)))
    reason = manager.command_log[-1][3]
    assert "unsupported seed extra state (version 2)" in reason and SEED0 in reason, reason
    assert_same(before, _live(rig))
    monkeypatch.undo()
    assert run_command(manager, rig.signed(make_rollback_command(0)))  # the real one restores


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format", 2, "unsupported checkpoint format 2"),
        ("global_step", None, "malformed clock or metrics"),
        ("boundary_pending", "false", "malformed clock or metrics"),
        ("val_metrics", {"loss": "low"}, "malformed clock or metrics"),
        ("val_metrics", {("a", "b"): 1.0}, "malformed clock or metrics"),
        ("graft_steps", 1.5, "malformed record of"),
        # Counts past what a later step can count on: taken, the next step raised in it.
        ("graft_steps", 2**63 - 1, "malformed record of"),
        ("bad_gradients", 2**62, "malformed record of"),
        ("bad_gradients", True, "malformed record of"),
        # The names of the layers the user's loop unfroze: a list of names, nothing else.
        ("unfrozen", "fc1.weight", "unfrozen is 'fc1.weight'"),
        ("unfrozen", [0], "unfrozen is [0]"),
        # Counts and a clock no run holds, in a checkpoint the run's key signed.
        ("graft_steps", -1, "malformed record of"),
        ("bad_gradients", -1, "malformed record of"),
        ("global_step", -1, "malformed clock or metrics"),
        ("epoch", -3, "malformed clock or metrics"),  # restored, the clock read -3
        ("epoch", 7, "malformed clock or metrics"),  # epoch 0's file: the clock read 7
    ],
)
def test_a_checkpoint_with_a_malformed_field_is_refused_before_anything_changes(
    rig: Rig, mlp, published, monkeypatch, field: str, value: object, message: str
) -> None:
    """Every field the commit assigns is read in phase 1: a checkpoint signed with the run's
    key but written by another version (or a bug) is refused with the live state as it was,
    never half restored by a commit that fails on its clock (a newer format's payload is
    refused for its format, not for whichever field happened to be read first)."""
    manager = rig.manager
    _diverge_after_epoch_0(rig, mlp, published)
    before = _live(rig)

    def malformed(checkpoint: dict) -> None:
        if field == "format":
            checkpoint["format"] = value
            checkpoint["optimizers"] = None  # a newer layout: read only after its format
        elif field in ("graft_steps", "bad_gradients"):
            checkpoint["extra"]["seeds"][SEED1][field] = value
        else:
            checkpoint["extra"][field] = value

    loads_changed(manager, monkeypatch, malformed)
    assert not run_command(manager, rig.signed(make_rollback_command(0)))
    assert message in manager.command_log[-1][3], manager.command_log[-1][3]
    assert_same(before, _live(rig))


@pytest.mark.parametrize(
    ("seed_id", "column", "value", "message"),
    [
        (SEED1, StateColumn.LIFECYCLE_STAGE, 99, "lifecycle stage value 99 is outside"),
        (SEED0, StateColumn.EPOCHS_IN_STATE, -5, "EPOCHS_IN_STATE must be >= 0, got -5"),
        (SEED0, StateColumn.EMBARGO_COUNTER, -5, "EMBARGO_COUNTER must be >= 0, got -5"),
        # SEED1 held no kernel at epoch 0: ACTIVE, it would have run the host alone.
        (SEED1, StateColumn.LIFECYCLE_STAGE, S.ACTIVE, "out[1] ACTIVE in its state table, and"),
        # SEED0's own state says ISOLATED_INIT: DORMANT, it kept its kernel and optimizer.
        (SEED0, StateColumn.LIFECYCLE_STAGE, S.DORMANT, "its own saved state ISOLATED_INIT"),
    ],
)
def test_a_checkpoint_whose_table_no_run_held_is_refused_before_anything_changes(
    rig: Rig, mlp, published, monkeypatch, seed_id: str, column, value: int, message: str
) -> None:
    """A state table signed with the run's key (re-signed, or written by another version) is
    read in phase 1 as the table of one instant of the run: each row a known stage with counts
    >= 0, each seed's stage one its record and its own saved state agree with. Negative counts
    and these contradictions were restored, the seed left ACTIVE without a kernel or DORMANT
    holding one."""
    manager = rig.manager
    _diverge_after_epoch_0(rig, mlp, published)
    before = _live(rig)
    row = manager.require_registry()[seed_id].seed.state_index

    def impossible(checkpoint: dict) -> None:
        checkpoint["state_table"][row, column] = int(value)

    loads_changed(manager, monkeypatch, impossible)
    assert not run_command(manager, rig.signed(make_rollback_command(0)))
    assert message in manager.command_log[-1][3], manager.command_log[-1][3]
    assert_same(before, _live(rig))
    monkeypatch.undo()
    assert run_command(manager, rig.signed(make_rollback_command(0)))  # the real one restores


def test_a_rollback_checks_the_checkpoints_table_rows_once(
    rig: Rig, mlp, published, monkeypatch
) -> None:
    """Phase 1 checks every row of the checkpoint's table (the stages it compares with the
    seeds' records and own states); the restore in phase 2 then writes them without reading
    them again. A restore called by itself still checks them (``test_checkpoints``)."""
    from kasmina.manager import rollback_plan, training_state
    from kasmina.stages import checked_row

    _diverge_after_epoch_0(rig, mlp, published)
    calls = {"plan": 0, "restore": 0}

    def counted(where: str):
        def check(row: object) -> list[int]:
            calls[where] += 1
            return checked_row(row)

        return check

    monkeypatch.setattr(rollback_plan, "checked_row", counted("plan"))
    monkeypatch.setattr(training_state, "checked_row", counted("restore"))
    assert run_command(rig.manager, rig.signed(make_rollback_command(0)))
    rows = rig.manager.require_registry().table.state_tensor.shape[0]
    assert calls == {"plan": rows, "restore": 0}


def test_a_restore_that_cannot_replay_its_boundary_is_refused_and_changes_nothing(
    rig: Rig, mlp, published
) -> None:
    """An epoch's checkpoint holds the state before that epoch's boundary: restored without
    the boundary to replay (a caller that passes none, as a replica repair does for a
    snapshot it took itself), it is refused before anything changes, rather than leaving the
    model an epoch boundary behind the clock it restores."""
    manager = rig.manager
    _diverge_after_epoch_0(rig, mlp, published)
    before = _live(rig)
    with pytest.raises(ValueError, match="needs its epoch boundary replayed"):
        rollback_module.restore_epoch(manager.state, manager.guard, 0)
    assert_same(before, _live(rig))
    assert run_command(manager, rig.signed(make_rollback_command(0)))  # with it, it restores


def test_a_rollback_restores_each_seeds_step_counts(rig: Rig, mlp) -> None:
    """A seed's grafting steps (its alpha schedule's position) and its run of clipped steps
    are the checkpoint's after a rollback, not the abandoned timeline's."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    record = manager.require_registry()[SEED0]
    record.graft_steps, record.bad_gradients = 3, 1  # where epoch 0 ends for this seed
    manager.end_epoch(0)
    record.graft_steps, record.bad_gradients = 9, 4  # the timeline the rollback abandons
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert (record.graft_steps, record.bad_gradients) == (3, 1)


def test_a_seed_quarantined_mid_step_trains_at_once_after_a_rollback_to_before(
    rig: Rig, mlp
) -> None:
    """A kernel that raised on each of three accumulated micro-batches quarantined its seed
    mid-step, its step lost (``finite_flag`` cleared), and no step polls a quarantined seed. A
    ROLLBACK to before restored the seed, its kernel healthy, but not the flag: the next step
    dropped its gradient and reported it fallen back. The quarantine cleared the flag."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    seed = manager.seed(SEED0)
    healthy = seed.kernel.forward

    def explode(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel exploded")

    seed.kernel.forward = explode
    for part, y in zip(rig.x.tensor_split(3), rig.y.tensor_split(3), strict=True):
        manager.backward(F.cross_entropy(rig.model(part), y) / 3)
    assert rig.stage(SEED0) == S.QUARANTINE and manager.step()["host_stepped"]
    seed.kernel.forward = healthy
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    report = rig.train(1)
    assert report["seeds_stepped"] == [SEED0] and report["nonfinite"] == []


def test_a_rollback_pins_exactly_the_originals_of_live_seeds(rig: Rig, mlp) -> None:
    """After a rollback a seed's cached original is pinned while the seed holds a kernel and is
    not TERMINATED, whether its kernel changed or not: a live seed never runs unpinned, and a
    TERMINATED one never keeps a pin (its original stays evictable)."""
    manager, cache = rig.manager, rig.manager.kernel_cache
    record = manager.require_registry()[SEED0]
    rig.train(1)
    manager.end_epoch(0)  # 0: no kernel
    assert rig.send("germinate", SEED0, mlp)
    walk_to_active(rig, [SEED0], epoch=1)  # 1: ISOLATED_INIT
    assert rig.send("terminate", SEED0)
    manager.end_epoch(2)  # 2: TERMINATED, its kernel kept, its original unpinned
    assert not record.pinned and not cache.is_pinned(mlp)

    def rolled_back_to(epoch: int, stage: S, pinned: bool) -> None:
        assert run_command(manager, rig.signed(make_rollback_command(epoch)))
        assert rig.stage(SEED0) == stage and record.kernel is not None
        assert record.pinned == cache.is_pinned(mlp) == pinned
        assert cache.stats()["pinned"] == int(pinned)  # the cache.pinned gauge

    rolled_back_to(1, S.ISOLATED_INIT, True)  # the same kernel, live again
    rolled_back_to(2, S.TERMINATED, False)  # the same kernel, terminal
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert record.kernel is None and not cache.is_pinned(mlp)
    rolled_back_to(2, S.TERMINATED, False)  # a kernel re-attached to a terminal seed
    assert manager.evict_kernel(mlp)  # no pin left behind by any of them


def test_isolation_violations_is_a_counter_a_rollback_never_lowers(kd_rig: Rig, mlp) -> None:
    """``isolation.violations`` is the manager's own count of violating steps; the live seeds'
    counts, which RECYCLING resets and a rollback puts back, are the gauge beside it."""
    rig, manager = kd_rig, kd_rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    for _ in range(2):  # leaking seed-only losses (below the breaker's limit)
        rig.slot.set_teacher_logits(torch.randn(16, 4))
        loss = F.cross_entropy(rig.model(rig.x), rig.y)
        kd = through_a_seed(manager.collect_kd_losses() + 1e-2 * rig.model.inp.weight.sum())
        manager.backward(loss, kd_loss=kd)
        assert not manager.step()["isolation_clean"]

    def isolation() -> dict:
        metrics = manager.export_leyline_telemetry().metrics
        return {m.name: (m.value, m.type) for m in metrics if m.name.startswith("isolation.")}

    before = isolation()
    assert before["isolation.violations"] == (2.0, MetricType.METRIC_TYPE_COUNTER)
    assert before["isolation.violating_steps"] == (2.0, MetricType.METRIC_TYPE_COUNTER)
    assert before["isolation.seed_violations"][0] == manager.seed(SEED0).isolation_violations > 0
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    after = isolation()
    assert manager.seed(SEED0).isolation_violations == 0  # the checkpoint's count
    assert after["isolation.violations"] == before["isolation.violations"]
    assert after["isolation.seed_violations"] == (0.0, MetricType.METRIC_TYPE_GAUGE)


@pytest.mark.parametrize("where", ["weights", "mirror", "pin", "monitor"])
def test_a_rollback_failing_before_its_commit_changes_nothing_not_even_a_probe(
    rig: Rig, mlp, published, monkeypatch, where: str
) -> None:
    """What can fail (the weights, the host mirror, the restored seeds' pins and monitors)
    happens before the commit, so a failure leaves everything as it was, including the probe
    result a COMPATIBILITY_CHECK seed holds for G3 and the pins of the live seeds."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    manager.end_epoch(0)
    assert rig.send("cull", SEED0)
    assert rig.send("germinate", SEED1, published[2])
    rig.train(2)
    manager.end_epoch(1)
    assert rig.send("advance", SEED1) and rig.stage(SEED1) == S.COMPATIBILITY_CHECK
    rig.train(1)  # the forward probes the kernel
    record = manager.require_registry()[SEED1]
    probe, monitor = record.seed.probe_result, record.monitor
    assert probe is not None and monitor is not None
    before = _live(rig)
    owners = {
        "weights": (rollback_module, "restore_training_state"),
        "mirror": (GPUStateTensor, "resync"),
        "pin": (manager.loader, "pin"),
        "monitor": (manager.guard, "new_monitor"),
    }
    manager.pending.rollback_kernels = None  # the pins are its application's (no fetch-ahead)
    _fail_once(monkeypatch, *owners[where])
    assert not run_command(manager, rig.signed(make_rollback_command(0)))
    monkeypatch.undo()
    assert_same(before, _live(rig))
    assert record.seed.probe_result is probe and record.monitor is monitor
    assert record.pinned and manager.kernel_cache.is_pinned(published[2])
    assert not manager.require_registry()[SEED0].pinned and not manager.kernel_cache.is_pinned(mlp)
    assert run_command(manager, rig.signed(make_rollback_command(0)))  # now it can
    assert manager.kernel_cache.is_pinned(mlp) and not manager.kernel_cache.is_pinned(published[2])


def test_a_rollback_whose_boundary_replay_fails_is_applied_and_says_so(
    rig: Rig, mlp, monkeypatch, caplog
) -> None:
    """The epoch boundary is replayed after the commit: if it fails, the rollback has happened
    all the same, so the command is reported applied, with the problem in its reason and in an
    ERROR log, never as a refusal of a change that was made."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    assert rig.send("cull", SEED0, embargo_epochs=1)
    manager.end_epoch(0)  # the checkpoint is written before this boundary's tick
    manager.end_epoch(1)
    _fail_once(monkeypatch, manager.execution, "epoch_boundary")
    with caplog.at_level(logging.ERROR, logger="kasmina.manager.rollback"):
        assert run_command(manager, rig.signed(make_rollback_command(0)))
    _, kind, ok, reason = manager.command_log[-1]
    assert kind == "rollback" and ok and "replaying its epoch boundary failed" in reason
    assert [r.levelno for r in caplog.records if "epoch boundary" in r.getMessage()] == [
        logging.ERROR
    ]
    assert manager.epoch == 0 and rig.stage(SEED0) == S.COOLDOWN  # the checkpoint's state
    assert rig.train(1)["host_stepped"]
