"""Tamper-evident checkpoints and explicit cadence, driven through a real manager.

Every fault is injected for real into a checkpoint that a real ``end_epoch`` wrote; every
rollback is a signed ROLLBACK command applied at a safe point. A refused rollback must leave
the weights, every optimizer's state, the state table and the training clock bitwise as they
were, and no byte of a refused file may reach ``torch.load``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import random
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kasmina.control.builders import make_rollback_command
from kasmina.errors import CheckpointIntegrityError, GradientIsolationViolationError
from kasmina.isolation.monitor import GradientIsolationMonitor
from kasmina.manager.config import KasminaConfig
from kasmina.utils.keyring import Keyring
from kasmina.utils.state_io import CHECKPOINT_MAGIC, clone_state
from tests.manager.helpers import Rig, make_config, run_command

_HEADER = len(CHECKPOINT_MAGIC) + 4  # magic, then the manifest's length


@pytest.fixture
def empty_store(tmp_path: Path) -> Path:
    """No artifacts are needed: the host trains with its seeds dormant, which is enough to
    change weights, optimizer state and the state table between checkpoints."""
    store = tmp_path / "urza"
    store.mkdir()
    return store


def _live(rig: Rig) -> dict:
    """Everything a refused rollback must leave bitwise as it was."""
    manager, table = rig.manager, rig.slot.state_table
    return {
        "model": clone_state(rig.model.state_dict()),
        "optimizers": clone_state(manager.optimizers.state_dict()),
        "table": table.state_tensor.clone(),
        "stages": table.stages(),
        "epoch": manager.epoch,
        "global_step": manager.global_step,
        "val_metrics": dict(manager.val_metrics),
    }


def _same(a, b) -> bool:
    """Bitwise equality of nested containers of tensors and scalars."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _rollback(rig: Rig, epoch: int) -> tuple[bool, str]:
    """Send a signed ROLLBACK and apply it; whether it ran, and the reason if refused."""
    ok = run_command(rig.manager, rig.signed(make_rollback_command(epoch, reason="test")))
    return ok, rig.manager.command_log[-1][3]


def _manifest_end(raw: bytes) -> int:
    return _HEADER + int.from_bytes(raw[len(CHECKPOINT_MAGIC) : _HEADER], "big")


def _resign(raw: bytes, key: bytes, **changes) -> bytes:
    """The checkpoint ``raw`` with its manifest fields changed and re-signed by ``key``, by an
    HMAC computed here (canonical JSON without the "hmac" field), not by the code under test."""
    end = _manifest_end(raw)
    fields = json.loads(raw[_HEADER:end])
    fields.update(changes)
    fields.pop("hmac")

    def canonical(obj: dict) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")

    fields["hmac"] = hmac.new(key, canonical(fields), hashlib.sha256).hexdigest()
    manifest = canonical(fields)
    return CHECKPOINT_MAGIC + len(manifest).to_bytes(4, "big") + manifest + raw[end:]


STATE_IO = "kasmina.utils.state_io"


@pytest.fixture
def load_calls(monkeypatch) -> list[int]:
    """Counts ``torch.load`` calls: a refused file must never reach it. (An epoch boundary's
    check that the state it writes reads back, ``unreadable_entry``, loads bytes of its own.)"""
    calls: list[int] = []
    real = torch.load

    def counting(*args, **kwargs):
        caller = sys._getframe(1)
        if (caller.f_globals["__name__"], caller.f_code.co_name) != (STATE_IO, "_reads_back"):
            calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    return calls


def _diverged_rig(tmp_path: Path, store: Path, keyring: Keyring, **overrides) -> Rig:
    """Checkpoints of epochs 0 and 1, then more training, so a rollback would change things."""
    rig = Rig(make_config(tmp_path, store, **overrides), keyring)
    rig.train(2)
    rig.manager.end_epoch(0, {"acc": 0.25})
    rig.train(2)
    rig.manager.end_epoch(1, {"acc": 0.5})
    rig.train(1)
    return rig


def test_fifty_single_bit_flips_are_all_refused_and_change_nothing(
    tmp_path, empty_store, keyring, load_calls
) -> None:
    rig = _diverged_rig(tmp_path, empty_store, keyring)
    path = rig.manager.checkpoints.path_for(0)
    pristine = path.read_bytes()
    manifest_end = _manifest_end(pristine)
    before = _live(rig)
    rng = random.Random(20261201)
    for flip in range(50):
        # Alternate between the header (magic, length, manifest) and the payload.
        low, high = (0, manifest_end) if flip % 2 == 0 else (manifest_end, len(pristine))
        bit = rng.randrange(low * 8, high * 8)
        damaged = bytearray(pristine)
        damaged[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(damaged)
        ok, reason = _rollback(rig, 0)
        assert not ok and reason.startswith("CheckpointIntegrityError"), (flip, bit, reason)
        assert _same(before, _live(rig)), (flip, bit)
    assert load_calls == []  # not one byte of a damaged file was unpickled
    path.write_bytes(pristine)
    assert _rollback(rig, 0)[0] and len(load_calls) == 1  # the intact file still restores


def test_a_truncated_checkpoint_is_refused(tmp_path, empty_store, keyring, load_calls) -> None:
    rig = _diverged_rig(tmp_path, empty_store, keyring)
    path = rig.manager.checkpoints.path_for(1)
    pristine = path.read_bytes()
    before = _live(rig)
    for cut in (len(pristine) - 1, len(pristine) // 2, _manifest_end(pristine), 20, 3):
        path.write_bytes(pristine[:cut])
        ok, reason = _rollback(rig, 1)
        assert not ok and "CheckpointIntegrityError" in reason and "truncated" in reason, cut
        assert _same(before, _live(rig))
    path.write_bytes(pristine + b"\0")  # extended is as wrong as truncated
    assert "truncated or extended" in _rollback(rig, 1)[1]
    assert load_calls == [] and _same(before, _live(rig))


def test_a_payload_or_file_swapped_from_another_epoch_is_refused(
    tmp_path, empty_store, keyring, load_calls
) -> None:
    rig = _diverged_rig(tmp_path, empty_store, keyring)
    store = rig.manager.checkpoints
    epoch0, epoch1 = store.path_for(0).read_bytes(), store.path_for(1).read_bytes()
    before = _live(rig)
    # Epoch 1's signed manifest in front of epoch 0's payload: its hash and size do not match.
    store.path_for(1).write_bytes(epoch1[: _manifest_end(epoch1)] + epoch0[_manifest_end(epoch0) :])
    ok, reason = _rollback(rig, 1)
    assert not ok and "CheckpointIntegrityError" in reason
    # Epoch 0's whole, authentic file under epoch 1's name: the signed epoch says otherwise.
    store.path_for(1).write_bytes(epoch0)
    ok, reason = _rollback(rig, 1)
    assert not ok and "expected the epoch checkpoint of epoch 1" in reason
    assert load_calls == [] and _same(before, _live(rig))


def test_a_manifest_resigned_with_a_wrong_key_is_refused(
    tmp_path, empty_store, keyring, load_calls
) -> None:
    rig = _diverged_rig(tmp_path, empty_store, keyring)
    path = rig.manager.checkpoints.path_for(0)
    pristine = path.read_bytes()
    before = _live(rig)
    # The attacker's own payload with a consistent hash and size, signed by a key of theirs.
    evil = pristine[_manifest_end(pristine) :][::-1]
    forged = _resign(
        pristine[: _manifest_end(pristine)] + evil,
        os.urandom(32),
        sha256=hashlib.sha256(evil).hexdigest(),
        size=len(evil),
    )
    path.write_bytes(forged)
    ok, reason = _rollback(rig, 0)
    assert not ok and "manifest HMAC does not verify" in reason
    # The right key re-signing the same manifest gives back a file that verifies: the check
    # above failed on the key alone.
    key = rig.manager.config.checkpoint_key_path.read_bytes()
    path.write_bytes(_resign(pristine, key))
    assert load_calls == [] and _same(before, _live(rig))
    assert _rollback(rig, 0)[0]


def _default_config(store: Path, **overrides) -> KasminaConfig:
    """Default run state settings: run id, run directory, checkpoint and key paths."""
    return KasminaConfig(
        device="cpu", urza_url=str(store), urza_retries=0, latency_budget_ms=1e4, **overrides
    )


def test_runs_under_one_home_never_see_each_others_checkpoints(
    tmp_path, empty_store, keyring, monkeypatch, load_calls
) -> None:
    monkeypatch.setenv("KASMINA_HOME", str(tmp_path / "home"))
    run_a = Rig(_default_config(empty_store), keyring)
    run_a.train(3)
    run_a.manager.end_epoch(0)
    a_weights = clone_state(run_a.model.state_dict())
    run_b = Rig(_default_config(empty_store), keyring)
    run_b.train(1)
    b_config, a_config = run_b.manager.config, run_a.manager.config
    assert b_config.run_dir != a_config.run_dir
    assert b_config.run_dir.parent == a_config.run_dir.parent == tmp_path / "home" / "runs"
    before = _live(run_b)
    ok, reason = _rollback(run_b, 0)  # run B has no checkpoint of its own
    assert not ok and "none kept yet" in reason
    # Run A's file copied into run B's directory under run B's name: B's key refuses it.
    a_file, b_file = run_a.manager.checkpoints.path_for(0), run_b.manager.checkpoints.path_for(0)
    assert a_file.parent != b_file.parent
    b_file.parent.mkdir(parents=True, exist_ok=True)  # held open by run B's store lock
    shutil.copyfile(a_file, b_file)
    ok, reason = _rollback(run_b, 0)
    assert not ok and "CheckpointIntegrityError" in reason
    assert load_calls == [] and _same(before, _live(run_b))
    assert not _same(a_weights, clone_state(run_b.model.state_dict()))
    # Run B's epochs (and their rotation) never touch run A's files.
    b_file.unlink()
    a_files = sorted(p.name for p in a_file.parent.iterdir())
    for epoch in range(8):
        run_b.manager.end_epoch(epoch)
    assert sorted(p.name for p in a_file.parent.iterdir()) == a_files
    assert run_a.manager.checkpoints.epochs() == [0]


def test_another_runs_checkpoint_is_refused_even_with_a_shared_key(
    tmp_path, empty_store, keyring, load_calls
) -> None:
    shared = {
        "checkpoint_key_file": str(tmp_path / "shared.key"),
        "checkpoint_dir": str(tmp_path / "shared-ckpt"),
    }
    run_a = _diverged_rig(tmp_path / "a", empty_store, keyring, run_id="run-a", **shared)
    run_b = Rig(make_config(tmp_path / "b", empty_store, run_id="run-b", **shared), keyring)
    run_b.train(1)
    assert run_b.manager.checkpoints.epochs() == []  # same directory, own names only
    before = _live(run_b)
    target = run_b.manager.checkpoints.path_for(0)
    shutil.copyfile(run_a.manager.checkpoints.path_for(0), target)
    ok, reason = _rollback(run_b, 0)
    assert not ok and "belongs to run 'run-a', not to this run 'run-b'" in reason
    assert load_calls == [] and _same(before, _live(run_b))
    target.unlink()
    assert run_a.manager.checkpoints.epochs() == [0, 1]


def test_cadence_writes_only_due_epochs_and_names_the_nearest(
    tmp_path, empty_store, keyring
) -> None:
    rig = Rig(make_config(tmp_path, empty_store, checkpoint_every_epochs=2), keyring)
    manager = rig.manager
    after: dict[int, dict] = {}
    for epoch in range(6):
        rig.train(1)
        manager.end_epoch(epoch)
        after[epoch] = _live(rig)
    assert manager.checkpoints.epochs() == [0, 2, 4]
    assert sorted(p.name for p in Path(manager.config.checkpoint_dir).iterdir()) == [
        f".{manager.config.run_id}.checkpoints.lock",  # the run's store lock, never pruned
        *(f"{manager.config.run_id}.epoch_{e:08d}.ckpt" for e in (0, 2, 4)),
    ]
    before = _live(rig)
    ok, reason = _rollback(rig, 3)
    assert not ok and reason.startswith("CheckpointUnavailableError")
    assert "every 2 epoch(s)" in reason and "nearest kept: epoch 2 and 4" in reason
    assert _same(before, _live(rig))
    assert _rollback(rig, 2)[0] and _same(after[2], _live(rig))


def test_max_rollback_epochs_bounds_the_reach(tmp_path, empty_store, keyring) -> None:
    rig = Rig(make_config(tmp_path, empty_store, max_rollback_epochs=2), keyring)
    for epoch in range(5):
        rig.train(1)
        rig.manager.end_epoch(epoch)
    assert rig.manager.checkpoints.epochs() == [2, 3, 4]
    ok, reason = _rollback(rig, 1)
    assert not ok and "kept 2 epoch(s) back" in reason and "nearest kept: epoch 2" in reason


def test_memory_mode_restores_bitwise_and_stays_unaliased(tmp_path, empty_store, keyring) -> None:
    rig = Rig(make_config(tmp_path, empty_store, checkpoint_mode="memory"), keyring)
    manager = rig.manager
    rig.train(2)
    manager.end_epoch(0, {"acc": 0.1})
    after = _live(rig)
    for _ in range(2):  # the second round proves the kept snapshot survived the first restore
        rig.train(3)
        manager.end_epoch(1, {"acc": 0.9})
        assert not _same(after, _live(rig))
        assert _rollback(rig, 0)[0]
        assert _same(after, _live(rig))
    assert not Path(manager.config.checkpoint_dir).exists()
    assert not manager.config.checkpoint_key_path.exists()  # nothing on disk needed a key


def test_off_mode_writes_nothing_and_refuses_a_rollback(tmp_path, empty_store, keyring) -> None:
    rig = Rig(make_config(tmp_path, empty_store, checkpoint_mode="off"), keyring)
    rig.train(1)
    rig.manager.end_epoch(0)
    rig.train(1)
    before = _live(rig)
    ok, reason = _rollback(rig, 0)
    assert not ok and 'checkpoint_mode is "off"' in reason and "cannot roll back" in reason
    assert _same(before, _live(rig))
    assert not Path(rig.manager.config.checkpoint_dir).exists()
    assert not rig.manager.config.checkpoint_key_path.exists()


def test_key_is_created_0600_in_the_run_directory_and_the_run_is_logged_once(
    tmp_path, empty_store, keyring, caplog
) -> None:
    rig = Rig(make_config(tmp_path, empty_store), keyring)
    config = rig.manager.config
    key_path = config.run_dir / "checkpoint.key"
    assert config.checkpoint_key_path == key_path and not key_path.exists()
    with caplog.at_level(logging.INFO, logger="kasmina.manager.checkpoints"):
        for epoch in range(3):
            rig.manager.end_epoch(epoch)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600 and len(key_path.read_bytes()) == 32
    announced = [r.getMessage() for r in caplog.records if "run directory" in r.getMessage()]
    assert len(announced) == 1
    assert config.run_id in announced[0] and str(config.run_dir) in announced[0]


def test_emergency_checkpoints_of_a_run_are_signed(tmp_path, empty_store, keyring) -> None:
    rig = Rig(make_config(tmp_path, empty_store), keyring)
    signer = rig.manager.state.checkpoint_signer
    assert rig.manager.guard.checkpoint_signer is signer  # one key for the run's files
    torch.manual_seed(0)
    host, seed = nn.Linear(3, 3), nn.Linear(3, 3)
    monitor = GradientIsolationMonitor(
        "s0",
        list(seed.named_parameters()),
        list(host.named_parameters()),
        max_violations=1,
        checkpoint_dir=rig.manager.config.emergency_checkpoint_dir,
        checkpoint_signer=signer,
        state_provider=lambda: {"seed": clone_state(seed.state_dict())},
    )
    monitor.note_violation("injected")
    with pytest.raises(GradientIsolationViolationError) as info:
        monitor.verify_isolation_after_step()
    path = info.value.checkpoint_path
    assert path.name.startswith(f"{signer.run_id}.emergency_isolation_s0_")
    payload = signer.read(path, kind="emergency")
    assert torch.equal(payload["state"]["seed"]["weight"], seed.weight)
    with pytest.raises(CheckpointIntegrityError, match="expected the epoch checkpoint"):
        signer.read(path, kind="epoch", epoch=0)  # not interchangeable with an epoch's
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0x04
    path.write_bytes(raw)
    with pytest.raises(CheckpointIntegrityError, match="SHA-256"):
        signer.read(path, kind="emergency")
