"""The user's tracked objects (``manager.track``) in checkpoints, across processes and ranks:
a resumed run tracks afresh, in its own order, and a repaired rank tracks as its source does
(``kasmina.manager.tracked``; docs/design.md §6a)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kasmina.manager.coordination import ManagerReplica
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring
from tests.manager.helpers import Rig, make_config
from tests.manager.test_resume import rollback


class Count:
    """A tracked object of the smallest kind: one number as its state."""

    def __init__(self) -> None:
        self.n = 0

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.n = state["n"]


def _ranks_with_a_second_ema(
    tmp_path: Path, store: Path, keyring: Keyring, values: dict[str, int]
) -> dict[str, tuple[KasminaKernelManager, Count]]:
    """A manager per name, each having made its EMA again (a second generation) holding its
    value, one step trained and epoch 0's checkpoint written."""
    ranks = {}
    for name, value in values.items():
        rig = Rig(make_config(tmp_path / name, store), keyring)
        rig.manager.track("ema", Count())
        ema = Count()
        rig.manager.track("ema", ema)
        ema.n = value
        rig.train(1)
        rig.manager.end_epoch(0)
        ranks[name] = (rig.manager, ema)
    return ranks


@pytest.mark.parametrize(
    "names", [("scheduler", "scaler"), ("scaler", "scheduler"), ("scaler",)], ids=str
)
def test_a_resumed_run_gets_its_tracked_objects_back_whatever_order_it_tracks_them_in(
    tmp_path: Path, store: Path, keyring: Keyring, names: tuple[str, ...]
) -> None:
    """Generations were one counter over every name, in the process: a resumed run that
    tracked its scheduler and scaler in another order, or tracked only one, matched none of
    the saved generations, and the ROLLBACK left them at their fresh states (reported applied,
    with a warning that the checkpoint held no state of them)."""
    config = make_config(tmp_path, store, run_id="resume")
    first = Rig(config, keyring)
    scheduler, scaler = Count(), Count()
    first.manager.track("scheduler", scheduler)
    first.manager.track("scaler", scaler)
    first.train(1)
    scheduler.n, scaler.n = 7, 1024
    first.manager.end_epoch(0)
    first.manager.close()

    rig = Rig(config, keyring, record=False)
    fresh = {name: Count() for name in names}
    for name in names:
        rig.manager.track(name, fresh[name])
    assert rollback(rig.manager, keyring, 0), rig.manager.command_log[-1]
    want = {"scheduler": 7, "scaler": 1024}
    assert {name: fresh[name].n for name in names} == {name: want[name] for name in names}


def test_a_resumed_run_gets_the_state_of_an_object_its_first_process_tracked_again(
    tmp_path: Path, store: Path, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    """The first process made its EMA again (a second generation of the name); the resumed
    one tracks its EMA once: it gets the checkpoint's state. Tracked again in the resumed
    process, the copy made since is left alone by the old checkpoints, as in one process."""
    config = make_config(tmp_path, store, run_id="resume")
    first = Rig(config, keyring)
    first.manager.track("ema", Count())
    ema = Count()
    first.manager.track("ema", ema)
    first.train(1)
    ema.n = 42
    first.manager.end_epoch(0)
    first.manager.close()

    rig = Rig(config, keyring, record=False)
    resumed = Count()
    rig.manager.track("ema", resumed)
    assert rollback(rig.manager, keyring, 0) and resumed.n == 42
    again = Count()
    rig.manager.track("ema", again)
    assert rollback(rig.manager, keyring, 0) and again.n == 0
    assert "holds the state of objects tracked under ['ema'] before the live ones" in caplog.text


def test_a_repaired_rank_loads_its_sources_tracked_states_as_the_source_would(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Every rank made its EMA again (a second generation). A repair loads the source's
    state into the repaired rank's EMA, and so does a later ROLLBACK to the checkpoint it
    took from the source, as on the source: a state of another writer alone would go only
    into a first generation, and the ranks' EMAs would part."""
    ranks = _ranks_with_a_second_ema(tmp_path, store, keyring, {"source": 5, "repaired": 9})
    (source, source_ema), (repaired, repaired_ema) = ranks.values()
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    replica = ManagerReplica(repaired.state, repaired.guard, lock=repaired.intake.lock)
    replica.import_state(sent)
    assert repaired_ema.n == 5
    source_ema.n = repaired_ema.n = 0
    for manager in (source, repaired):
        assert rollback(manager, keyring, 0)
    assert (source_ema.n, repaired_ema.n) == (5, 5)


def test_a_rank_repaired_from_a_repaired_rank_keeps_loading_as_its_source(
    tmp_path: Path, store: Path, keyring: Keyring
) -> None:
    """Three ranks. C was repaired from A, then B from C while C was back at that epoch: B's
    store took C's checkpoint, written by A. B counted C's mark as a peer's but not A's, so a
    later ROLLBACK to that epoch left B's second-generation EMA alone, silently (tracked
    states are not checksummed). The marks the kept checkpoint carries count too."""
    ranks = _ranks_with_a_second_ema(tmp_path, store, keyring, {"A": 1, "B": 2, "C": 3})
    rigs = {name: manager for name, (manager, _) in ranks.items()}
    emas = {name: ema for name, (_, ema) in ranks.items()}

    def replica(manager) -> ManagerReplica:
        return ManagerReplica(manager.state, manager.guard, lock=manager.intake.lock)

    replica(rigs["C"]).import_state(replica(rigs["A"]).export_state())
    replica(rigs["B"]).import_state(replica(rigs["C"]).export_state())
    assert {k: e.n for k, e in emas.items()} == {"A": 1, "B": 1, "C": 1}
    for ema in emas.values():
        ema.n = 0
    for manager in rigs.values():
        assert rollback(manager, keyring, 0)
    assert {k: e.n for k, e in emas.items()} == {"A": 1, "B": 1, "C": 1}
