"""The repair of a rank in one process, no process group: a ``ManagerReplica``'s snapshot
exported from one manager and imported into another restores seeds, optimizers and table, takes
the source's timeline of checkpoints (not its own, which may differ), leaves the loop's unfrozen
layers as they were, runs under the manager's lock and never on a closed manager; its checksum
and health check cover what a sync compares."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
import torch

from kasmina.control.builders import make_rollback_command
from kasmina.control.relay import EpochSyncResult
from kasmina.manager.coordination import ManagerReplica
from kasmina.manager.ddp import DistributedKasmina
from kasmina.utils.state_io import clone_state
from tests.manager.ddp_helpers import _signed
from tests.manager.helpers import SEED0, Rig, S, assert_same, make_config
from tests.manager.test_checkpoints import _written_on


@pytest.mark.parametrize("rolled_back", ["source", "repaired"])
def test_a_repaired_rank_takes_the_sources_timeline_of_checkpoints(
    tmp_path, store, keyring, rolled_back: str
) -> None:
    """A ROLLBACK that applied on one rank and failed on the other: the repair restored the
    state, but the repaired rank's checkpoint store kept its own timeline (a restore from a
    store holding only the source's snapshot), so its next ``end_epoch`` was refused there
    (or deleted checkpoints the other rank kept) and the ranks' stores split."""
    names = ("source", "repaired")
    rigs = {name: Rig(make_config(tmp_path / name, store), keyring) for name in names}
    for rig in rigs.values():
        for epoch in range(4):
            rig.train(1)
            rig.manager.end_epoch(epoch)
    rolled = rigs[rolled_back]
    assert _rollback(rolled, 1)
    source, repaired = rigs["source"].manager, rigs["repaired"].manager
    replica = ManagerReplica(repaired.state, repaired.guard, lock=repaired.intake.lock)
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    replica.import_state(sent)
    assert repaired.checkpoints.abandoned_after == source.checkpoints.abandoned_after
    assert repaired.epoch == source.epoch
    next_epoch = source.epoch + 1
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(next_epoch)  # allowed on both, as on the source
    assert repaired.checkpoints.epochs() == source.checkpoints.epochs()


@pytest.mark.parametrize("after", [-1, "3", True])
def test_a_payload_with_an_impossible_timeline_is_refused_before_the_repair(
    tmp_path, store, keyring, mlp, after: object
) -> None:
    """A payload whose ``abandoned_after`` is no epoch (-1: no store writes it) restored the
    state and then raised where the repaired rank took the source's timeline: the repair
    reported failed, and applied."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    dk.sync_epoch(0)
    rig.train(2)
    checkpoint = torch.load(io.BytesIO(dk.replica.export_state()), weights_only=True)
    checkpoint["extra"]["abandoned_after"] = after
    payload = io.BytesIO()
    torch.save(checkpoint, payload)
    rig.manager.seed(SEED0).quarantine("test")
    before = clone_state(rig.model.state_dict())
    with pytest.raises(ValueError, match="abandoned_after is .*, no epoch"):
        dk.replica.import_state(payload.getvalue())
    assert rig.stage(SEED0) == S.QUARANTINE  # not repaired
    assert_same(before, clone_state(rig.model.state_dict()))


def test_a_checkpoint_written_on_another_device_goes_with_the_repair(
    tmp_path, store, keyring
) -> None:
    """The sync epoch's checkpoint, written on a device this process lacks (a run resumed on
    another GPU index, or on the CPU), was loaded onto that device for the payload: it failed,
    and the repaired rank was told to drop its own checkpoint of that epoch."""
    rig = Rig(make_config(tmp_path, store), keyring)
    rig.train(1)
    rig.manager.end_epoch(0)
    checkpoints = rig.manager.checkpoints
    _, payload = checkpoints.signer.read_payload(checkpoints.path_for(0), epoch=0)
    moved = _written_on(payload, "cuda:7")
    checkpoints.signer.write_payload(moved, checkpoints.path_for(0), kind="epoch", epoch=0)
    replica = ManagerReplica(rig.manager.state, rig.manager.guard, lock=rig.manager.intake.lock)
    shipped = torch.load(io.BytesIO(replica.export_state()), weights_only=True)
    assert shipped["extra"]["checkpoints"] == [0]
    assert_same(shipped["latest_checkpoint"], checkpoints.load(0, map_location="cpu"))


def _weights(rig: Rig, epoch: int) -> dict[str, torch.Tensor]:
    return rig.manager.checkpoints.load(epoch)["modules"]["model"]


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_repaired_rank_takes_the_sources_checkpoints_where_its_own_may_differ(
    tmp_path, store, keyring, mode: str
) -> None:
    """A rank repaired at the sync of epoch 3 had written its checkpoint 3 from its own state
    before the sync found it apart, and kept those of epochs the source's rollback abandoned
    (2), and those it wrote while apart and not repaired (a failed repair): a later ROLLBACK to
    one of them restored there a state no other rank had (with two ranks the tie went to rank
    0, whichever rank held the right one). It now holds the source's checkpoint 3, and none of
    the others."""
    names = ("source", "repaired")
    config = {name: make_config(tmp_path / name, store, checkpoint_mode=mode) for name in names}
    rigs = {name: Rig(config[name], keyring) for name in names}
    for rig in rigs.values():
        for epoch in range(3):
            rig.train(1)
            rig.manager.end_epoch(epoch)
    assert _rollback(rigs["source"], 1)  # applied on the source alone
    repaired = rigs["repaired"]
    with torch.no_grad():
        repaired.model.inp.weight.add_(1.0)  # and apart in its own way
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(3)
    source_store = rigs["source"].manager.checkpoints
    assert source_store.epochs() == [0, 1, 3] and 2 in repaired.manager.checkpoints.epochs()
    m = repaired.manager
    replica = ManagerReplica(m.state, m.guard, lock=m.intake.lock)
    source = rigs["source"].manager
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    replica.import_state(sent)
    assert m.checkpoints.epochs() == source_store.epochs()
    mine, theirs = _weights(repaired, 3), _weights(rigs["source"], 3)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)

    # Apart at the sync of epoch 4 and not repaired there: its checkpoint 4 is its own, and
    # the repair at epoch 5 takes the source's 5 and drops its 4 (the source has one).
    with torch.no_grad():
        repaired.model.inp.weight.add_(1.0)
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(4)
    replica.note_sync(EpochSyncResult(4, 1, 2, (), (1, 2), (1,)))  # apart, not repaired
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(5)
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    replica.import_state(sent)
    assert 4 in source_store.epochs() and 4 not in m.checkpoints.epochs()
    assert 5 in m.checkpoints.epochs()
    mine, theirs = _weights(repaired, 5), _weights(rigs["source"], 5)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    replica.note_sync(EpochSyncResult(5, 1, 2, (), (1, 1), (1,), 0, (1,)))  # repaired
    assert replica.diverged_since is None


def test_a_repair_leaves_the_ranks_unfrozen_layers_as_the_loop_set_them(
    monkeypatch, tmp_path, store, keyring
) -> None:
    """Every rank's loop unfroze a layer and has not given it a group yet when the sync
    repairs one of them: the restore's commit froze it again on that rank alone (no group of
    the source's holds it), and the ranks trained apart from then on."""
    import tests.manager.helpers as helpers
    from tests.manager.test_host_param_groups import FrozenOut

    monkeypatch.setattr(helpers, "Host", FrozenOut)
    names = ("source", "repaired")
    rigs = {name: Rig(make_config(tmp_path / name, store), keyring) for name in names}
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(0)
        rig.model.out.host.weight.requires_grad_(True)
    source, m = rigs["source"].manager, rigs["repaired"].manager
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    ManagerReplica(m.state, m.guard, lock=m.intake.lock).import_state(sent)
    assert rigs["repaired"].model.out.host.weight.requires_grad


def test_a_source_that_cannot_read_its_checkpoint_still_repairs(tmp_path, store, keyring) -> None:
    """The source's checkpoint of the sync's epoch does not verify: it ships the snapshot
    without it (before, the export raised and no rank was repaired), and the repaired rank,
    whose own may differ, drops its own."""
    names = ("source", "repaired")
    config = {name: make_config(tmp_path / name, store) for name in names}
    rigs = {name: Rig(config[name], keyring) for name in names}
    for rig in rigs.values():
        for epoch in range(2):
            rig.train(1)
            rig.manager.end_epoch(epoch)
    source, m = rigs["source"].manager, rigs["repaired"].manager
    path = source.checkpoints.path_for(1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    ManagerReplica(m.state, m.guard, lock=m.intake.lock).import_state(sent)
    assert m.checkpoints.epochs() == [0]


def test_a_rank_apart_from_epoch_0_on_remembers_epoch_0() -> None:
    replica = ManagerReplica.__new__(ManagerReplica)
    replica.diverged_since = None
    for epoch in (0, 1):
        replica.note_sync(EpochSyncResult(epoch, 1, 2, (), (1, 2), (1,)))
    assert replica.diverged_since == 0


def test_the_replica_checksum_covers_an_unfrozen_layer(
    monkeypatch, tmp_path, store, keyring
) -> None:
    """A layer frozen at attach, unfrozen and given a group: its weights are the host's too,
    and a rank whose copy of them drifted is found apart."""
    import tests.manager.helpers as helpers
    from tests.manager.test_host_param_groups import FrozenOut

    monkeypatch.setattr(helpers, "Host", FrozenOut)
    rig = Rig(make_config(tmp_path, store), keyring)
    m, weight = rig.manager, rig.model.out.host.weight
    weight.requires_grad_(True)
    m.optimizers.optimizer("host").add_param_group({"params": [weight]})
    rig.train(1)
    replica = ManagerReplica(m.state, m.guard, lock=m.intake.lock)
    before = replica.checksum()
    with torch.no_grad():
        weight.add_(1.0)
    assert replica.checksum() != before


def _rollback(rig: Rig, epoch: int) -> bool:
    raw = rig.signed(make_rollback_command(epoch))
    assert rig.manager.handle_adaptation_command(raw)
    return all(o.ok for o in rig.manager.apply_pending(wait=True))


def test_a_replica_snapshot_repairs_a_manager_in_one_process(tmp_path, store, keyring, mlp) -> None:
    """export -> corrupt -> import puts the seed, its optimizer and the table back."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    dk.sync_epoch(0)
    rig.train(2)
    good, payload = dk.replica.checksum(), dk.replica.export_state()
    weight = rig.manager.seed(SEED0).seed_parameters()[0]
    with torch.no_grad():
        weight.add_(1.0)
    rig.manager.seed(SEED0).quarantine("test")
    assert dk.replica.checksum() != good
    dk.replica.import_state(payload)
    assert dk.replica.checksum() == good and rig.stage(SEED0) == S.ISOLATED_INIT
    rig.train(1)  # and it trains on


def test_a_repair_runs_under_the_managers_lock_and_never_on_a_closed_manager(
    tmp_path, store, keyring, mlp, monkeypatch
) -> None:
    """A repair restored weights, kernels and optimizers outside the manager's lock, so a
    ``close()`` (or a command) on another thread ran in the middle of it, and a repair after
    a ``close()`` restored into the closed manager."""
    import kasmina.manager.coordination as coordination

    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    dk.sync_epoch(0)
    rig.train(1)
    payload, restore, held = dk.replica.export_state(), coordination.restore_epoch, []

    def other_thread_can_take_the_lock() -> bool:
        took: list[bool] = []

        def attempt() -> None:
            took.append(rig.manager.intake.lock.acquire(blocking=False))
            if took[0]:
                rig.manager.intake.lock.release()

        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()
        return took[0]

    def watched(*args: Any, **kwargs: Any) -> Any:
        held.append(not other_thread_can_take_the_lock())
        return restore(*args, **kwargs)

    monkeypatch.setattr(coordination, "restore_epoch", watched)
    dk.replica.import_state(payload)
    assert held == [True]
    rig.train(1)
    before = dk.replica.checksum()
    rig.manager.close()
    with pytest.raises(RuntimeError, match="closed"):
        dk.replica.import_state(payload)
    assert held == [True]  # nothing restored
    assert dk.replica.checksum() == before


@pytest.mark.parametrize("where", ["seed weight", "host weight", "optimizer state"])
def test_a_replica_with_a_non_finite_tensor_is_not_healthy(
    tmp_path, store, keyring, mlp, where: str
) -> None:
    """What the checksum covers is what the health check reads: a rank holding a NaN there is
    never the one a sync repairs the others from (``minority_ranks``)."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    dk.sync_epoch(0)
    rig.train(2)
    assert dk.replica.healthy()
    if where == "seed weight":
        tensor = rig.manager.seed(SEED0).seed_parameters()[0]
    elif where == "host weight":
        tensor = rig.manager.require_registry().host_params[0]
    else:
        tensor = next(iter(rig.manager.optimizers.optimizer(SEED0).state.values()))["exp_avg"]
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    assert not dk.replica.healthy()
