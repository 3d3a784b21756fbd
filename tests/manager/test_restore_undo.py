"""A restore (``restore_training_state``, what a ROLLBACK and a repair run) whose write fails
after its checks passed is undone: the live modules, optimizers and state table are put back
bit for bit, so a failed rollback never leaves training half restored."""

from __future__ import annotations

import pytest
import torch

from kasmina.manager.training_state import capture_training_state, restore_training_state
from tests.manager.helpers import SEED0, Rig
from tests.manager.test_checkpoints import _state_equal


def _trained_on(rig: Rig, mlp: str):
    """A snapshot two steps in, then an epoch's end and three more steps: returns the parts a
    restore writes, the snapshot, and the live state it must be undone to."""
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(2)
    # Two modules, so that a failure of the second comes after the first was written.
    modules = {"inp": rig.model.inp, "out": rig.model.out}
    table = manager.require_registry().table.state_tensor
    snapshot = capture_training_state(modules, manager.optimizers, table)
    manager.end_epoch(0)  # the seed's row counts the epoch: the table changes too
    rig.train(3)
    live = capture_training_state(modules, manager.optimizers, table)
    for part in ("modules", "optimizers", "state_table"):
        assert not _state_equal(snapshot[part], live[part]), part  # a restore changes each
    return modules, table, snapshot, live


def test_a_module_load_failing_after_others_were_written_is_undone(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimizers and the first module are written before the slot's load fails: the
    caller gets that failure, and every part is back as it was before the restore."""
    modules, table, snapshot, live = _trained_on(rig, mlp)
    slot = rig.model.out
    real_load = slot.load_state_dict
    calls: list[int] = []

    def fails_once(state_dict, strict=True):
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("device lost mid-restore")
        return real_load(state_dict, strict=strict)

    monkeypatch.setattr(slot, "load_state_dict", fails_once)
    with pytest.raises(RuntimeError, match="device lost mid-restore") as raised:
        restore_training_state(snapshot, modules, rig.manager.optimizers, table)
    assert not getattr(raised.value, "__notes__", None)  # the undo itself succeeded
    assert calls == [0, 1]  # the failed write, then the undo's
    after = capture_training_state(modules, rig.manager.optimizers, table)
    for part in ("modules", "optimizers", "state_table"):
        assert _state_equal(after[part], live[part]), part
    rig.train(1)  # and training goes on from there


def test_a_state_table_write_failing_last_is_undone(
    rig: Rig, mlp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state table is written last, after every module and optimizer: its failure puts
    the modules and optimizers back too, and the table keeps its live rows."""
    modules, table, snapshot, live = _trained_on(rig, mlp)
    real_copy = torch.Tensor.copy_
    failed: list[bool] = []

    def copy_(self, src, *args, **kwargs):
        if self is table and not failed:
            failed.append(True)
            raise RuntimeError("table write failed")
        return real_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_)
    with pytest.raises(RuntimeError, match="table write failed"):
        restore_training_state(snapshot, modules, rig.manager.optimizers, table)
    monkeypatch.undo()
    assert failed == [True]
    after = capture_training_state(modules, rig.manager.optimizers, table)
    for part in ("modules", "optimizers", "state_table"):
        assert _state_equal(after[part], live[part]), part
    # The same snapshot restores fully once the write works.
    restore_training_state(snapshot, modules, rig.manager.optimizers, table)
    restored = capture_training_state(modules, rig.manager.optimizers, table)
    for part in ("modules", "optimizers", "state_table"):
        assert _state_equal(restored[part], snapshot[part]), part
