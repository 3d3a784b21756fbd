"""Atomic epoch checkpoints, retention, safe loading, and bit-for-bit rollback."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.manager.checkpoints import (
    CheckpointManager,
    capture_training_state,
    restore_training_state,
)
from kasmina.utils.state_io import atomic_torch_save, safe_torch_load


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


def test_atomic_save_roundtrip(tmp_path):
    path = atomic_torch_save({"w": torch.arange(4.0)}, tmp_path / "sub" / "x.pt")
    assert path == tmp_path / "sub" / "x.pt"
    assert torch.equal(safe_torch_load(path)["w"], torch.arange(4.0))
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
    assert torch.equal(safe_torch_load(path)["v"], torch.tensor([1.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # temp file cleaned up


def test_crash_at_replace_keeps_previous_file(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"v": torch.tensor([1.0])})

    def failing_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr("kasmina.utils.state_io.os.replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        manager.save(1, {"v": torch.tensor([9.0])})
    monkeypatch.undo()
    assert torch.equal(manager.load(1)["v"], torch.tensor([1.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_00000001.pt"]


def test_retention_keeps_last_n(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    assert manager.latest_epoch() is None
    for epoch in range(6):
        manager.save(epoch, {"epoch": epoch})
    assert manager.epochs() == [3, 4, 5]
    assert manager.latest_epoch() == 5
    assert manager.load(4) == {"epoch": 4}
    with pytest.raises(FileNotFoundError, match="epoch 0"):
        manager.load(0)


def test_saving_after_rollback_drops_abandoned_epochs(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    for epoch in range(6):
        manager.save(epoch, {"epoch": epoch})
    manager.save(4, {"epoch": 4, "retrained": True})
    assert manager.epochs() == [3, 4]
    assert manager.load(4)["retrained"] is True


def test_stale_temporaries_removed_and_ignored(tmp_path):
    (tmp_path / ".epoch_00000002.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("unrelated")
    manager = CheckpointManager(tmp_path)
    assert manager.epochs() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_keep_last(tmp_path, bad):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=bad)


@pytest.mark.parametrize("bad", [-1, 2.0, "3", None])
def test_invalid_epoch(tmp_path, bad):
    with pytest.raises(ValueError, match="epoch"):
        CheckpointManager(tmp_path).save(bad, {})


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_load_refuses_arbitrary_pickles(tmp_path):
    manager = CheckpointManager(tmp_path)
    torch.save({"x": _Evil()}, manager.path_for(3))
    with pytest.raises(pickle.UnpicklingError):
        manager.load(3)


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
    manager = CheckpointManager(tmp_path)
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
