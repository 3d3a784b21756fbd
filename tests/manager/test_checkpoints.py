"""Checkpoint stores (signed disk, memory, off), cadence and reach, the checkpoint key, atomic
writes, safe loading, and bit-for-bit restore of captured training state."""

from __future__ import annotations

import io
import logging
import os
import pickle
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_rollback_command
from kasmina.errors import CheckpointIntegrityError, CheckpointUnavailableError
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.manager.checkpoints import (
    DiskCheckpointStore,
    MemoryCheckpointStore,
    NoCheckpointStore,
    open_checkpoint_store,
)
from kasmina.manager.config import KasminaConfig
from kasmina.manager.training_state import capture_training_state, restore_training_state
from kasmina.utils.atomic import STALE_TEMPORARY_S
from kasmina.utils.state_io import (
    CHECKPOINT_KEY_BYTES,
    CheckpointSigner,
    atomic_torch_save,
    clone_state,
    load_or_create_checkpoint_key,
)
from tests.crash import KILLED, die, run_in_child
from tests.manager.helpers import Rig, make_config, run_command


def _state_equal(a, b) -> bool:
    """Recursive bitwise equality of nested containers of tensors and scalars."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_state_equal(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _signer(tmp_path, run_id: str = "run-a") -> CheckpointSigner:
    return CheckpointSigner(tmp_path / "keys" / f"{run_id}.key", run_id)


def _store(tmp_path, run_id: str = "run-a", **policy) -> DiskCheckpointStore:
    return DiskCheckpointStore(tmp_path / "ckpt", _signer(tmp_path, run_id), **policy)


def test_atomic_save_roundtrip(tmp_path):
    path = atomic_torch_save({"w": torch.arange(4.0)}, tmp_path / "sub" / "x.pt")
    assert path == tmp_path / "sub" / "x.pt"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4.0))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.pt"]


def test_crash_mid_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"v": torch.tensor([1.0])}, path)
    real_save = torch.save

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"v": torch.tensor([2.0])}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.tensor([1.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # temp file cleaned up


def test_crash_at_replace_keeps_previous_signed_file(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.save(1, {"v": torch.tensor([1.0])})

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr("kasmina.utils.atomic.os.replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        store.save(1, {"v": torch.tensor([9.0])})
    monkeypatch.undo()
    assert torch.equal(store.load(1)["v"], torch.tensor([1.0]))
    assert [p.name for p in store.directory.iterdir()] == ["run-a.epoch_00000001.ckpt"]


def test_reach_keeps_the_epochs_a_rollback_may_need(tmp_path):
    store = _store(tmp_path, max_rollback_epochs=2)
    assert store.latest_epoch() is None and store.epochs() == []
    for epoch in range(6):
        store.save(epoch, {"epoch": epoch})
    assert store.epochs() == [3, 4, 5]  # 5 - 2 = 3 is the oldest reachable
    assert store.latest_epoch() == 5
    assert store.load(4) == {"epoch": 4}
    with pytest.raises(CheckpointUnavailableError, match="epoch 0 .*nearest kept: epoch 3$"):
        store.load(0)


def test_cadence_and_the_nearest_epochs_of_a_refusal(tmp_path):
    store = _store(tmp_path, every_epochs=3, max_rollback_epochs=6)
    assert [e for e in range(10) if store.is_due(e)] == [0, 3, 6, 9]
    for epoch in (0, 3, 6, 9):
        store.save(epoch, {"epoch": epoch})
    assert store.epochs() == [3, 6, 9]
    with pytest.raises(CheckpointUnavailableError) as info:
        store.load(7)
    assert "every 3 epoch(s)" in str(info.value) and "nearest kept: epoch 6 and 9" in str(
        info.value
    )
    with pytest.raises(CheckpointUnavailableError, match="nearest kept: epoch 9$"):
        store.load(12)
    with pytest.raises(CheckpointUnavailableError, match="none kept yet"):
        _store(tmp_path, run_id="run-b").load(0)


def test_saving_after_rollback_drops_abandoned_epochs(tmp_path):
    store = _store(tmp_path, max_rollback_epochs=2)
    for epoch in range(6):
        store.save(epoch, {"epoch": epoch})
    store.save(4, {"epoch": 4, "retrained": True})
    assert store.epochs() == [3, 4]
    assert store.load(4)["retrained"] is True


def test_the_epochs_saved_after_a_rollback_are_the_live_timeline(tmp_path):
    """After a rollback to epoch 0, epoch 1 saved again is the live timeline's: saving epoch 2
    next deletes the abandoned timeline's epochs, never the epoch 1 just written."""
    store = _store(tmp_path)
    for epoch in range(3):
        store.save(epoch, {"epoch": epoch})
    store.abandon_after(0)
    store.save(1, {"epoch": 1, "retrained": True})
    store.save(2, {"epoch": 2, "retrained": True})
    assert store.epochs() == [0, 1, 2]
    assert store.load(1)["retrained"] is True and store.load(2)["retrained"] is True


def test_an_abandoned_checkpoint_that_cannot_be_deleted_stops_the_save(tmp_path, monkeypatch):
    """The new epoch is written only once the abandoned timeline's later epochs are gone: a
    delete that fails raises, and nothing is written beside the timeline it would replace."""
    store = _store(tmp_path)
    for epoch in range(3):
        store.save(epoch, {"epoch": epoch})
    store.abandon_after(0)

    def undeletable(epoch: int) -> None:
        raise PermissionError(f"epoch {epoch}: read-only")

    monkeypatch.setattr(store, "_delete", undeletable)
    with pytest.raises(OSError, match="abandoned checkpoint of epoch 2 .*epoch 1 is not written"):
        store.save(1, {"epoch": 1, "retrained": True})
    monkeypatch.undo()
    assert store.epochs() == [0, 1, 2] and store.load(1) == {"epoch": 1}


def test_a_repaired_store_drops_its_checkpoints_from_the_divergence_on(tmp_path):
    """A rank repaired from another keeps only the checkpoints the other kept, written before
    it diverged (``since``, that epoch included), then takes the other's latest one."""
    store = _store(tmp_path)
    for epoch in range(4):
        store.save(epoch, {"epoch": epoch})
    store.follow_timeline(None, kept=[0, 1, 2, 3], since=2)
    assert store.epochs() == [0, 1]
    store.follow_timeline(0, kept=[0, 1], latest=(1, {"epoch": 1, "theirs": True}))
    assert store.epochs() == [0, 1] and store.load(1)["theirs"] is True
    assert store.abandoned_after == 0


def test_an_epoch_before_a_written_checkpoint_is_refused_though_its_boundary_failed(tmp_path):
    """A boundary that failed after its checkpoint was written left the clock behind: that
    epoch may be ended again (its checkpoint rewritten), but an epoch before it may not, since
    saving it would delete a checkpoint of the live timeline."""
    store = _store(tmp_path)
    store.save(5, {"epoch": 5})  # end_epoch(5) with the clock at 3, its tick then raised
    store.check_next_epoch(5, 3)
    with pytest.raises(ValueError, match=r"not after this run's checkpoints of epochs \[5\]"):
        store.check_next_epoch(4, 3)


def test_a_closed_store_writes_no_checkpoint(tmp_path):
    """A closed store has let go of the run's lock: another trainer of the run may hold it now,
    so a save is refused and writes nothing."""
    store = DiskCheckpointStore(
        tmp_path / "ckpt", _signer(tmp_path), lock_path=tmp_path / "ckpt" / ".run-a.lock"
    )
    store.close()
    with pytest.raises(RuntimeError, match="not this process's to write"):
        store.save(0, {"epoch": 0})
    assert store.epochs() == []


def test_a_signed_checkpoint_that_holds_no_mapping_is_refused(tmp_path):
    """A checkpoint is a mapping of its parts: a signed file that holds anything else (another
    version's layout, a bug) is refused by the store, not handed to a rollback to fail in."""
    store = _store(tmp_path)
    store.signer.write([torch.zeros(1)], store.path_for(0), kind="epoch", epoch=0)
    with pytest.raises(ValueError, match="holds no state mapping"):
        store.load(0)


@pytest.mark.parametrize("killed_at", ["delete 1", "delete 2", "delete 3", "write", "prune"])
def test_a_save_killed_anywhere_after_a_rollback_leaves_one_timeline(tmp_path, killed_at):
    """After a ROLLBACK to epoch 1, saving epoch 2 replaces the timeline 2, 3, 4. Killed at any
    point (each delete, the rename, the pruning after it), the disk holds a prefix of one
    timeline, never the new epoch 2 beside the old 3 and 4 (which a restart would be told to
    roll back to, continuing the abandoned timeline after the new epoch)."""
    store = _store(tmp_path)
    for epoch in range(5):
        store.save(epoch, {"timeline": "old"})

    def save_after_rollback() -> None:
        if killed_at.startswith("delete"):
            real_delete, deletes = DiskCheckpointStore._delete, []

            def delete(self, epoch):
                real_delete(self, epoch)
                deletes.append(epoch)
                if len(deletes) == int(killed_at.split()[1]):
                    die()

            DiskCheckpointStore._delete = delete
        elif killed_at == "write":
            os.replace = lambda src, dst: die()
        else:
            DiskCheckpointStore._prune = lambda self, epoch: die()
        store.abandon_after(1)
        store.save(2, {"timeline": "new"})

    assert run_in_child(save_after_rollback) in (0, KILLED)
    restarted = _store(tmp_path)
    epochs = restarted.epochs()
    timelines = [restarted.load(epoch)["timeline"] for epoch in epochs]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 2  # a prefix, 0 and 1 kept
    if "new" in timelines:
        assert epochs == [0, 1, 2] and timelines == ["old", "old", "new"]
    else:
        assert set(timelines) == {"old"}
    with pytest.raises(ValueError, match=rf"to epoch {epochs[-1]} for the latest"):
        restarted.check_next_epoch(0, -1)  # a restarted trainer is still refused


def test_runs_sharing_a_directory_never_list_rotate_or_clean_each_others_files(tmp_path):
    other = _store(tmp_path, run_id="run-b")
    for epoch in range(4):
        other.save(epoch, {"run": "b"})
    (tmp_path / "ckpt" / ".run-b.epoch_00000009.ckpt.x1.tmp").write_bytes(b"b's write")
    (tmp_path / "ckpt" / ".run-a.epoch_00000002.ckpt.x2.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt" / "notes.txt").write_text("unrelated")
    mine = _store(tmp_path, max_rollback_epochs=0)  # removes only its own stale temp file
    assert mine.epochs() == []
    for epoch in range(6):
        mine.save(epoch, {"run": "a"})
    mine.save(1, {"run": "a"})  # abandons run-a's epochs 2..5, and nothing of run-b
    assert mine.epochs() == [1] and other.epochs() == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        ".run-b.epoch_00000009.ckpt.x1.tmp",
        "notes.txt",
        "run-a.epoch_00000001.ckpt",
        "run-b.epoch_00000000.ckpt",
        "run-b.epoch_00000001.ckpt",
        "run-b.epoch_00000002.ckpt",
        "run-b.epoch_00000003.ckpt",
    ]


def test_only_the_names_the_store_writes_are_listed_as_its_checkpoints(tmp_path):
    """A file of the run's name pattern in another spelling (a copy renamed with 9 digits) is
    no checkpoint the store can read or delete by its epoch: listed, it made that epoch
    "kept", so a rollback to it failed with FileNotFoundError, a restart was told to roll
    back to it, and pruning never removed it."""
    store = _store(tmp_path, max_rollback_epochs=0)
    store.save(0, {"v": 0})
    folder = tmp_path / "ckpt"
    (folder / "run-a.epoch_000000000.ckpt").write_bytes(store.path_for(0).read_bytes())
    (folder / "run-a.epoch_000000007.ckpt").write_bytes(b"a user's file")
    assert store.epochs() == [0] and store.latest_epoch() == 0
    with pytest.raises(CheckpointUnavailableError, match="no checkpoint of epoch 7"):
        store.load(7)
    big = 10**8  # path_for's spelling past 8 digits is listed
    store.save(big, {"v": big})
    assert store.path_for(big).name == "run-a.epoch_100000000.ckpt"
    assert store.epochs() == [big] and store.load(big) == {"v": big}
    assert (folder / "run-a.epoch_000000007.ckpt").read_bytes() == b"a user's file"


def test_a_restarted_trainer_cannot_end_an_epoch_that_deletes_the_runs_checkpoints(
    tmp_path, keyring
):
    """A new manager of the same run starts its clock again (epoch -1), while the run's
    checkpoints are on disk: ending an epoch they already hold is refused, changing nothing,
    until a ROLLBACK gives up the epochs after its target."""
    store = tmp_path / "urza"  # no artifacts: the seeds stay dormant
    store.mkdir()
    first = Rig(make_config(tmp_path, store, run_id="run-a"), keyring)
    for epoch in range(4):
        first.train(1)
        first.manager.end_epoch(epoch)
    first.manager.close()  # as if its process were gone: the run's lock is released
    again = Rig(make_config(tmp_path, store, run_id="run-a"), keyring)
    manager = again.manager
    again.train(1)
    for epoch in (0, 3):
        with pytest.raises(ValueError, match=r"checkpoints of epochs \[.*signed ROLLBACK.*run_id"):
            manager.end_epoch(epoch)
    assert manager.checkpoints.epochs() == [0, 1, 2, 3] and manager.epoch == -1
    assert run_command(manager, again.signed(make_rollback_command(1)))
    manager.end_epoch(2)  # the timeline after epoch 1 is abandoned: epoch 3 goes
    assert manager.checkpoints.epochs() == [0, 1, 2] and manager.epoch == 2
    manager.end_epoch(3)


class _NumpyExtraState(nn.Module):
    """A module whose extra state ``torch.save`` writes and ``weights_only`` does not read."""

    def __init__(self) -> None:
        super().__init__()
        self.value: object = np.arange(3)

    def get_extra_state(self) -> object:
        return self.value

    def set_extra_state(self, value: object) -> None:
        self.value = value


def _checkpointed_with_extra_state(tmp_path, keyring) -> Rig:
    """A rig whose epoch 0 is checkpointed, then given a module with extra state (a NumPy
    array); no artifacts: the seeds stay dormant."""
    store = tmp_path / "urza"
    store.mkdir()
    rig = Rig(make_config(tmp_path, store, max_rollback_epochs=1), keyring)
    rig.train(1)
    rig.manager.end_epoch(0)
    rig.model.extra = _NumpyExtraState()
    return rig


def test_no_epoch_checkpoint_is_written_that_could_not_be_read_back(tmp_path, keyring, caplog):
    """A module's extra state holding a NumPy array made every signed checkpoint unreadable
    (torch.load with weights_only refuses it): each was written, refused at every rollback,
    and pruned the readable ones. None is written while the state holds it (warned, as for a
    float64 model); once it no longer does, checkpoints are written and restored again."""
    rig = _checkpointed_with_extra_state(tmp_path, keyring)
    manager = rig.manager
    for epoch in (1, 2):
        rig.train(1)
        with caplog.at_level(logging.WARNING, logger="kasmina.manager.rollback"):
            manager.end_epoch(epoch)
        assert f"epoch {epoch}: no checkpoint written" in caplog.text
        assert "extra._extra_state: UnpicklingError: Unsupported global" in caplog.text
    assert manager.checkpoints.epochs() == [0] and manager.epoch == 2
    # What weights_only reads (bytes, a set, a device, a NumPy scalar written as its number).
    rig.model.extra.value = [b"xy", {1, 2}, torch.device("cpu"), np.float64(0.5)]
    rig.train(1)
    manager.end_epoch(3)
    assert manager.checkpoints.epochs() == [3]
    rig.train(1)
    assert run_command(manager, rig.signed(make_rollback_command(3)))
    assert manager.epoch == 3 and rig.model.extra.value == [b"xy", {1, 2}, torch.device("cpu"), 0.5]


def _written_on(payload: bytes, device: str) -> bytes:
    """``payload`` (``torch.save`` bytes of CPU tensors) as if its tensors had been on
    ``device``: the location each storage's record names, rewritten in the archive's pickle."""
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(payload)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target,
    ):
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("data.pkl"):
                cpu = b"X\x03\x00\x00\x00cpu"  # BINUNICODE "cpu"
                assert cpu in data
                place = device.encode()
                data = data.replace(cpu, b"X" + len(place).to_bytes(4, "little") + place)
            target.writestr(info.filename, data)
    return out.getvalue()


def test_a_checkpoint_written_on_a_device_this_process_lacks_rolls_back(tmp_path, keyring):
    """A disk checkpoint was loaded onto the devices its tensors were saved from: a run resumed
    on another GPU index, or on the CPU, could not roll back to it (a memory store's snapshot
    and a repair's payload already came back on the CPU, the loads moving each tensor)."""
    store = tmp_path / "urza"  # no artifacts: the seeds stay dormant
    store.mkdir()
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    rig.train(1)
    manager.end_epoch(0)
    at_zero = clone_state(rig.model.state_dict()), clone_state(manager.optimizers.state_dict())
    checkpoints = manager.checkpoints
    _, payload = checkpoints.signer.read_payload(checkpoints.path_for(0), epoch=0)
    moved = _written_on(payload, "cuda:7")
    checkpoints.signer.write_payload(moved, checkpoints.path_for(0), kind="epoch", epoch=0)
    rig.train(2)
    assert run_command(manager, rig.signed(make_rollback_command(0)))
    assert _state_equal(rig.model.state_dict(), at_zero[0])
    assert _state_equal(clone_state(manager.optimizers.state_dict()), at_zero[1])


def test_a_listing_that_fails_after_the_write_only_defers_pruning(
    tmp_path, keyring, monkeypatch, caplog
):
    """Pruning runs once the epoch's checkpoint is written, so none of its failures fails the
    boundary: the directory listing raising OSError right after the write is logged, the
    boundary completes (clock, metrics, tick), and the next save prunes what this one left."""
    store = tmp_path / "urza"  # no artifacts: the seeds stay dormant
    store.mkdir()
    rig = Rig(make_config(tmp_path, store, max_rollback_epochs=1), keyring)
    manager = rig.manager
    for epoch in range(2):
        rig.train(1)
        manager.end_epoch(epoch)
    checkpoints, table = manager.checkpoints, manager.registry.table
    ages = [table.read_row(r.index)["EPOCHS_IN_STATE"] for r in manager.registry]
    write, listing, armed = checkpoints._write, checkpoints.epochs, []

    def write_then_arm(epoch: int, state) -> None:
        write(epoch, state)
        if not armed:  # once
            armed.append(True)

    def epochs() -> list[int]:
        if armed and armed[-1]:
            armed[-1] = False
            raise OSError(5, "Input/output error")
        return listing()

    monkeypatch.setattr(checkpoints, "_write", write_then_arm)
    monkeypatch.setattr(checkpoints, "epochs", epochs)
    rig.train(1)
    with caplog.at_level(logging.WARNING, logger="kasmina.manager.checkpoints"):
        manager.end_epoch(2, {"acc": 0.5})
    assert armed == [False]  # the listing after the write raised, once
    assert "could not list the checkpoints to prune after epoch 2" in caplog.text
    assert manager.epoch == 2 and manager.val_metrics == {"acc": 0.5}
    assert [table.read_row(r.index)["EPOCHS_IN_STATE"] for r in manager.registry] == [
        age + 1 for age in ages
    ]  # the boundary's tick ran
    assert listing() == [0, 1, 2]  # epoch 0, out of reach, is left on disk for now
    with pytest.raises(ValueError, match="not after the last epoch ended"):
        manager.end_epoch(2)  # done once: not run twice
    rig.train(1)
    manager.end_epoch(3)
    assert listing() == [2, 3] and manager.epoch == 3
    assert checkpoints.load(2)["extra"]["val_metrics"] == {"acc": 0.5}  # the one written


def test_two_live_trainers_of_one_run_cannot_share_its_disk_checkpoints(tmp_path, keyring):
    """Separate nonce ledgers do not separate checkpoints: a second live trainer of the run
    (a rank given the same run_id) is refused when its checkpoint store is built, before it
    writes anything; another run_id, another checkpoint_dir or memory checkpoints are fine."""
    store = tmp_path / "urza"  # no artifacts: the seeds stay dormant
    store.mkdir()

    def trainer(name: str, **settings) -> Rig:
        settings.setdefault("run_id", "shared")
        ledger = str(tmp_path / f"nonces-{name}.log")
        return Rig(make_config(tmp_path, store, nonce_ledger=ledger, **settings), keyring)

    first = trainer("first")
    first.train(1)
    first.manager.end_epoch(0)
    # Its own nonce ledger; the run's checkpoints are there, so it opens its store (and
    # takes the run's lock) as it starts, and is refused then, before anything is written.
    with pytest.raises(RuntimeError, match="held by another live trainer") as refused:
        trainer("second")
    assert "its own run_id" in str(refused.value) and "nonce_ledger" in str(refused.value)
    assert first.manager.checkpoints.epochs() == [0]
    # Another node: its own run directory (its key, its ledger), the same checkpoint directory.
    with pytest.raises(RuntimeError, match="held by another live trainer"):
        trainer("node-2", runs_root=str(tmp_path / "node-2"))
    other_run = trainer("other-run", run_id="other")
    other_dir = trainer("other-dir", checkpoint_dir=str(tmp_path / "ckpt-2"))
    in_memory = trainer("in-memory", checkpoint_mode="memory")
    for rig in (other_run, other_dir, in_memory):
        rig.train(1)
        rig.manager.end_epoch(0)
    first.manager.close()  # releases the run's checkpoint lock: the run may start again
    third = trainer("third")
    third.manager.close()  # its store closed with it: a refused end_epoch opens none again
    with pytest.raises(RuntimeError, match="closed"):
        third.manager.end_epoch(1)
    assert trainer("fourth").manager.checkpoints.epochs() == [0]


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"every_epochs": 0}, "every_epochs must be an int >= 1"),
        ({"every_epochs": 1.5}, "every_epochs must be an int >= 1"),
        ({"max_rollback_epochs": -1}, "max_rollback_epochs must be an int >= 0"),
        ({"max_rollback_epochs": True}, "max_rollback_epochs must be an int >= 0"),
    ],
)
def test_invalid_policy(tmp_path, policy, message):
    with pytest.raises(ValueError, match=message):
        _store(tmp_path, **policy)


@pytest.mark.parametrize("bad", [-1, 2.0, "3", None])
def test_invalid_epoch(tmp_path, bad):
    with pytest.raises(ValueError, match="epoch"):
        _store(tmp_path).save(bad, {})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("checkpoint_every_epochs", 0, "checkpoint_every_epochs must be an int >= 1, got 0"),
        ("checkpoint_every_epochs", 2.0, "checkpoint_every_epochs must be an int >= 1"),
        ("max_rollback_epochs", -1, "max_rollback_epochs must be an int >= 0, got -1"),
        ("checkpoint_mode", "ram", "checkpoint_mode must be one of .*'disk', 'memory', 'off'"),
        ("checkpoint_key_file", "", "checkpoint_key_file must be None or a path"),
    ],
)
def test_invalid_checkpoint_settings_name_their_range(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        KasminaConfig(runs_root=str(tmp_path), **{field: value})


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_load_refuses_unsigned_files_and_arbitrary_pickles_even_when_signed(tmp_path):
    store = _store(tmp_path)
    store.save(3, {"ok": torch.ones(1)})
    torch.save({"x": torch.zeros(1)}, store.path_for(3))  # a plain torch file in its place
    with pytest.raises(CheckpointIntegrityError, match="not a signed Kasmina checkpoint"):
        store.load(3)
    # Authentic bytes are still loaded weights_only: a signed pickle cannot run code.
    import io

    buffer = io.BytesIO()
    torch.save({"x": _Evil()}, buffer)
    store.signer.write_payload(buffer.getvalue(), store.path_for(3), kind="epoch", epoch=3)
    with pytest.raises(pickle.UnpicklingError):
        store.load(3)


@pytest.mark.parametrize("created", [10**400, True])
def test_a_signed_manifest_with_an_impossible_creation_time_is_refused(
    tmp_path, monkeypatch, created
):
    """Signed with the run's key, but ``created`` is past a float's range (float() raised
    OverflowError) or not a number: an integrity error, as for any malformed manifest."""
    import kasmina.utils.state_io as state_io

    store = _store(tmp_path)
    store.save(3, {"ok": torch.ones(1)})
    monkeypatch.setattr(state_io.time, "time", lambda: created)
    store.save(3, {"ok": torch.ones(1)})
    monkeypatch.undo()
    with pytest.raises(CheckpointIntegrityError, match="not of format"):
        store.load(3)


def test_temp_files_of_killed_emergency_writes_are_removed_once_stale(tmp_path):
    """An emergency checkpoint write killed before its rename leaves a temp file holding seed
    state; opening the run's store removes it once no live writer can own it (older than
    ``STALE_TEMPORARY_S``), and never another run's."""
    config = make_config(tmp_path, tmp_path / "urza", run_id="run-a")
    signer = CheckpointSigner(config.checkpoint_key_path, config.run_id)
    emergency = Path(config.emergency_checkpoint_dir)

    def emergency_write_killed_before_its_rename() -> None:
        os.replace = lambda src, dst: die()
        name = f"{config.run_id}.emergency_isolation_s0_{time.time_ns()}.ckpt"
        signer.write({"seed_id": "s0"}, emergency / name, kind="emergency")

    assert run_in_child(emergency_write_killed_before_its_rename) == KILLED
    [temp] = emergency.iterdir()
    assert temp.name.startswith(".run-a.emergency_isolation_s0_") and temp.name.endswith(".tmp")
    other_run = emergency / ".run-b.emergency_isolation_s0_1.ckpt.abcd1234.tmp"
    other_run.write_bytes(b"run b's")
    stale = time.time() - 2 * STALE_TEMPORARY_S
    os.utime(other_run, (stale, stale))
    open_checkpoint_store(config, signer).close()
    assert temp.exists()  # fresh: it may be a live writer's
    os.utime(temp, (stale, stale))
    open_checkpoint_store(config, signer).close()
    assert sorted(emergency.iterdir()) == [other_run]


def test_a_key_creation_killed_after_its_link_leaves_no_second_link_for_good(tmp_path):
    """Killed between linking the new key into place and unlinking its temp name, a creation
    left a second link to the key; the key existed from then on, so the cleanup, which ran
    only before a creation, never ran again."""
    key = tmp_path / "checkpoint.key"
    load_or_create_checkpoint_key(key)
    leftover = tmp_path / ".checkpoint.key.abcd1234.tmp"
    os.link(key, leftover)
    fresh = tmp_path / ".checkpoint.key.fresh123.tmp"
    fresh.write_bytes(b"a live creator's")
    stale = time.time() - 2 * STALE_TEMPORARY_S
    os.utime(leftover, (stale, stale))
    assert load_or_create_checkpoint_key(key) == key.read_bytes()
    assert sorted(tmp_path.iterdir()) == sorted([key, fresh])


# ---------------------------------------------------------------- key, memory, off


def test_checkpoint_key_is_created_once_0600_and_never_by_a_read(tmp_path):
    signer = _signer(tmp_path)
    elsewhere = CheckpointSigner(tmp_path / "elsewhere.key", "run-a")
    foreign = elsewhere.write({"v": torch.zeros(2)}, tmp_path / "foreign.ckpt", epoch=0)
    with pytest.raises(CheckpointIntegrityError, match="no checkpoint key"):
        signer.read(foreign, epoch=0)  # a key minted now would verify nothing
    assert not signer.key_path.exists()
    path = signer.write({"v": torch.ones(2)}, tmp_path / "ckpt" / "a.ckpt", epoch=0)
    key = signer.key_path.read_bytes()
    assert len(key) == CHECKPOINT_KEY_BYTES
    assert stat.S_IMODE(os.stat(signer.key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # checkpoints are private too
    assert load_or_create_checkpoint_key(signer.key_path) == key  # reused, not replaced
    fresh = _signer(tmp_path)  # another process of the same run reads the same key
    assert torch.equal(fresh.read(path, epoch=0)["v"], torch.ones(2))
    assert "key=" not in repr(fresh) and key.hex() not in repr(fresh)


def test_checkpoint_key_file_formats(tmp_path):
    hex_file = tmp_path / "hex.key"
    hex_file.write_text("ab" * CHECKPOINT_KEY_BYTES + "\n")
    hex_file.chmod(0o600)
    assert load_or_create_checkpoint_key(hex_file) == b"\xab" * CHECKPOINT_KEY_BYTES
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(ValueError, match="32 raw bytes or 64 hex digits"):
        load_or_create_checkpoint_key(short)


def test_memory_store_keeps_cpu_copies_that_nothing_can_alias(tmp_path):
    store = MemoryCheckpointStore(every_epochs=2, max_rollback_epochs=2)
    weights = torch.arange(6.0)
    store.save(0, {"w": weights, "meta": {"steps": [1, 2]}})
    weights.add_(100)  # later training must not reach the snapshot
    store.save(2, {"w": weights.clone()})
    loaded = store.load(0)
    assert torch.equal(loaded["w"], torch.arange(6.0)) and loaded["w"].device.type == "cpu"
    loaded["w"].zero_()  # nor may a restored copy
    assert torch.equal(store.load(0)["w"], torch.arange(6.0))
    store.save(4, {"w": weights})
    assert store.epochs() == [2, 4] and not store.is_due(3)
    with pytest.raises(CheckpointUnavailableError, match="nearest kept: epoch 2$"):
        store.load(0)
    assert not list(tmp_path.iterdir())  # nothing on disk


def test_off_store_keeps_nothing_and_says_why():
    store = NoCheckpointStore()
    assert not any(store.is_due(e) for e in range(5)) and store.epochs() == []
    with pytest.raises(CheckpointUnavailableError, match='checkpoint_mode is "off"'):
        store.load(0)
    with pytest.raises(CheckpointUnavailableError, match='checkpoint_mode is "off"'):
        store.save(0, {})


# ---------------------------------------------------------------- rollback


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    host = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    seed_mod = nn.Linear(8, 8)
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=1e-2)
    opts.create_seed_optimizer("s0", seed_mod.parameters(), lr=1e-2)
    table = torch.zeros(4, 10, dtype=torch.int32)
    return host, seed_mod, opts, table


def _train(host, seed_mod, opts, table, steps: int, start: int) -> None:
    for step in range(start, start + steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(16, 6, generator=gen)
        y = torch.randn(16, 3, generator=gen)
        opts.zero_grad()
        hidden = host[:3](x)
        out = host[3](hidden + seed_mod(hidden.detach()))
        nn.functional.mse_loss(out, y).backward()
        opts.step("host", grad_clip_norm=1.0)
        opts.step("s0")
        table[:, 2] += 1
        table[step % 4, 0] = step % 11


def _snapshot(host, seed_mod, opts, table):
    return {
        "host": {k: v.clone() for k, v in host.state_dict().items()},
        "seed": {k: v.clone() for k, v in seed_mod.state_dict().items()},
        "opts": capture_training_state({}, opts)["optimizers"],
        "table": table.clone(),
    }


def test_rollback_restores_bit_for_bit_and_replays_identically(tmp_path):
    host, seed_mod, opts, table = _setup()
    _train(host, seed_mod, opts, table, steps=3, start=0)
    modules = {"host": host, "seed:s0": seed_mod}
    manager = _store(tmp_path)
    manager.save(3, capture_training_state(modules, opts, table, extra={"epoch": 3}))
    at_three = _snapshot(host, seed_mod, opts, table)

    _train(host, seed_mod, opts, table, steps=4, start=3)
    after_seven = _snapshot(host, seed_mod, opts, table)
    assert not _state_equal(after_seven["seed"], at_three["seed"])

    state = manager.load(3)
    assert state["extra"] == {"epoch": 3}
    restore_training_state(state, modules, opts, table)
    assert _state_equal(_snapshot(host, seed_mod, opts, table), at_three)

    # Same data after the rollback: the optimizer states were right, so the replay is exact.
    _train(host, seed_mod, opts, table, steps=4, start=3)
    assert _state_equal(_snapshot(host, seed_mod, opts, table), after_seven)


def test_in_memory_capture_is_a_snapshot_and_restores_twice():
    host, seed_mod, opts, table = _setup(1)
    _train(host, seed_mod, opts, table, steps=2, start=0)
    modules = {"host": host, "seed": seed_mod}
    captured = capture_training_state(modules, opts, table)
    reference = _snapshot(host, seed_mod, opts, table)
    for _ in range(2):
        _train(host, seed_mod, opts, table, steps=2, start=2)
        restore_training_state(captured, modules, opts, table)
        assert _state_equal(_snapshot(host, seed_mod, opts, table), reference)


def test_mismatched_checkpoint_is_rejected_without_touching_live_state():
    host, seed_mod, opts, table = _setup(2)
    _train(host, seed_mod, opts, table, steps=1, start=0)
    modules = {"host": host, "seed": seed_mod}
    captured = capture_training_state(modules, opts, table)
    _train(host, seed_mod, opts, table, steps=1, start=1)
    live = _snapshot(host, seed_mod, opts, table)

    wrong_table = capture_training_state(modules, opts, torch.zeros(5, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match="state table"):
        restore_training_state(wrong_table, modules, opts, table)
    for column, value, message in [(0, 11, "stage value 11"), (2, -1, "EPOCHS_IN_STATE")]:
        impossible = capture_training_state(modules, opts, table)  # signed, yet no table's
        impossible["state_table"][1, column] = value
        with pytest.raises(ValueError, match=message):
            restore_training_state(impossible, modules, opts, table)
    wrong_shape = capture_training_state({"host": host, "seed": nn.Linear(8, 4)}, opts, table)
    with pytest.raises(ValueError, match="shape"):
        restore_training_state(wrong_shape, modules, opts, table)
    with pytest.raises(ValueError, match="no state for modules"):
        restore_training_state(captured, {**modules, "other": nn.Linear(2, 2)}, opts, table)
    opts.create_seed_optimizer("s1", nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="optimizer state is for"):
        restore_training_state(captured, modules, opts, table)
    assert _state_equal(_snapshot(host, seed_mod, opts, table)["host"], live["host"])
    assert _state_equal(_snapshot(host, seed_mod, opts, table)["seed"], live["seed"])
    assert torch.equal(table, live["table"])


def test_a_captured_state_keeps_the_modules_format_versions() -> None:
    """A restore through ``load_state_dict`` needs each module's version (``_metadata``): an
    int8 dynamic ``Linear`` refused a state without it (KeyError), so a rollback of a host with
    a quantized layer failed."""
    from torch.ao.quantization import quantize_dynamic

    host = quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), {"0"})
    captured = capture_training_state({"host": host}, None, None)
    before = host(torch.ones(1, 4))
    host[1].weight.data.add_(1.0)
    restore_training_state(captured, {"host": host}, None, None)
    assert torch.equal(host(torch.ones(1, 4)), before)


def test_a_fresh_qat_module_takes_a_state_its_loader_resizes_and_nothing_else() -> None:
    """A resumed process builds its QAT host fresh (one-element fake-quant scales); the saved
    per-channel ones load, as ``load_state_dict`` takes them. A shape no loader makes is still
    refused before anything is written."""
    from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

    def build() -> nn.Module:
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(4, 6)).train()
        mlp.qconfig = get_default_qat_qconfig("x86")
        return prepare_qat(mlp)

    trained = build()
    trained(torch.randn(8, 4))
    captured = capture_training_state({"host": trained}, None, None)
    fresh = build()
    restore_training_state(captured, {"host": fresh}, None, None)
    assert torch.equal(fresh[0].weight_fake_quant.scale, trained[0].weight_fake_quant.scale)
    captured["modules"]["host"]["0.weight"] = torch.zeros(5, 4)
    before = clone_state(fresh.state_dict())
    with pytest.raises(ValueError, match="0.weight has shape"):
        restore_training_state(captured, {"host": fresh}, None, None)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())


def test_a_failed_restore_whose_undo_fails_too_reports_the_first_failure(
    monkeypatch, caplog
) -> None:
    """The caller must learn why the restore failed, not only why its undo did; the undo's
    failure is logged too (Python 3.10's traceback does not print notes)."""
    host, seed_mod, opts, table = _setup(3)
    modules = {"host": host, "seed": seed_mod}
    captured = capture_training_state(modules, opts, table)
    failures = iter([RuntimeError("device lost mid-restore"), RuntimeError("still lost")])

    def failing_load(state_dict, strict=True):
        raise next(failures)

    monkeypatch.setattr(seed_mod, "load_state_dict", failing_load)
    with pytest.raises(RuntimeError, match="device lost mid-restore") as raised:
        restore_training_state(captured, modules, opts, table)
    assert raised.value.__notes__ == [
        "undoing the partial restore failed too: RuntimeError: still lost"
    ]
    assert "still lost (the restore had failed with RuntimeError: device lost" in caplog.text


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_fifo_under_a_checkpoint_name_is_refused_without_blocking(tmp_path):
    signer = _signer(tmp_path)
    signer.write({"v": torch.ones(1)}, tmp_path / "real.ckpt", epoch=0)  # the key exists
    os.mkfifo(tmp_path / "pipe.ckpt")
    with pytest.raises(CheckpointIntegrityError, match="not a regular file"):
        signer.read(tmp_path / "pipe.ckpt", epoch=0)


def test_metrics_measured_before_a_command_applied_at_end_epoch_are_not_recorded(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A ROLLBACK that arrives while the trainer validates is applied at the start of
    ``end_epoch``: the metrics handed in were measured on the weights it discarded, and they
    were reported and checkpointed as the rolled-back model's (a loss far better than it has,
    under the epoch the trainer ended). They are dropped, with a warning; a boundary that
    applied no command records its metrics as before."""
    manager = rig.manager
    for epoch in range(3):
        rig.train(1)
        manager.end_epoch(epoch, {"val_loss": float(epoch)})
    keyring = rig.keyring
    raw = sign_command(make_rollback_command(1, reason="rewind"), keyring, "ctl")
    assert manager.handle_adaptation_command(raw.SerializeToString())  # queued, not applied
    with caplog.at_level(logging.WARNING, logger="kasmina.manager"):
        manager.end_epoch(3, {"val_loss": 0.001})  # measured before the ROLLBACK applied
    assert manager.command_log[-1][1:3] == ("rollback", True)
    assert manager.val_metrics == {}
    assert manager.state.checkpoints.load(3)["extra"]["val_metrics"] == {}
    assert "changed the model its validation metrics were measured on" in caplog.text
    rig.train(1)
    manager.end_epoch(4, {"val_loss": 4.0})
    assert manager.val_metrics == {"val_loss": 4.0}


def test_an_extra_state_that_holds_itself_skips_the_checkpoint_not_the_epoch(
    tmp_path, keyring, caplog
):
    """A structure the read-back check cannot walk (a list holding itself) raised
    ``RecursionError`` out of ``end_epoch``; it is named in the warning and that epoch's
    checkpoint is not written, the epoch ends."""
    rig = _checkpointed_with_extra_state(tmp_path, keyring)
    manager = rig.manager
    loop: list[object] = []
    loop.append(loop)
    rig.model.extra.value = loop
    rig.train(1)
    with caplog.at_level(logging.WARNING, logger="kasmina.manager.rollback"):
        manager.end_epoch(1)
    assert "epoch 1: no checkpoint written" in caplog.text and "hold itself" in caplog.text
    assert manager.checkpoints.epochs() == [0] and manager.epoch == 1
