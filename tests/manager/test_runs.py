"""Run directories left by earlier runs: listed, and pruned by age and count, never a live one.

Real managers write the runs (default checkpoint directories under the run directory, an epoch
checkpoint each); one stays open while the others are pruned around it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from kasmina.manager.runs import list_runs, prune_runs
from kasmina.utils.keyring import Keyring
from tests.cli.helpers import assert_one_line_error, run
from tests.manager.helpers import Rig, make_config

DAY = 86400.0


def _run(tmp_path: Path, store: Path, keyring: Keyring, run_id: str, close: bool = True) -> Rig:
    config = make_config(
        tmp_path, store, run_id=run_id, checkpoint_dir="", emergency_checkpoint_dir=""
    )
    rig = Rig(config, keyring)
    rig.train(1)
    rig.manager.end_epoch(0, {"val_accuracy": 0.5})
    if close:
        rig.manager.close()
    return rig


def _age(path: Path, days: float) -> None:
    """Every file and directory of ``path`` last written ``days`` ago."""
    when = time.time() - days * DAY
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            os.utime(Path(folder, name), (when, when), follow_symlinks=False)
    os.utime(path, (when, when))


def test_prune_removes_old_runs_and_never_a_live_one(tmp_path, store, keyring) -> None:
    root = tmp_path / "runs"
    for run_id, days in (("old-a", 30), ("old-b", 10), ("recent", 0)):
        _run(tmp_path, store, keyring, run_id)
        _age(root / run_id, days)
    live = _run(tmp_path, store, keyring, "live", close=False)
    _age(root / "live", 40)  # old files, but a trainer holds the run
    (root / "notes" / "checkpoints").mkdir(parents=True)  # not a run: no file only Kasmina writes
    (tmp_path / "elsewhere").mkdir()
    (root / "linked").symlink_to(tmp_path / "elsewhere")

    runs = list_runs(root)
    assert [r.run_id for r in runs] == ["recent", "old-b", "old-a", "live"]  # newest first
    assert [r.in_use for r in runs] == [False, False, False, True]
    assert all(r.size_bytes > 0 for r in runs)

    assert prune_runs(root, older_than_s=5 * DAY, dry_run=True)[0].run_id == "old-b"
    assert sorted(os.listdir(root)) == ["linked", "live", "notes", "old-a", "old-b", "recent"]
    removed = prune_runs(root, older_than_s=20 * DAY)
    assert [r.run_id for r in removed] == ["old-a"]
    removed = prune_runs(root, keep=1)  # "recent" is the newest; "live" is held
    assert [r.run_id for r in removed] == ["old-b"]
    assert sorted(os.listdir(root)) == ["linked", "live", "notes", "recent"]

    live.train(1)  # the live run is untouched and goes on
    live.manager.end_epoch(1, {"val_accuracy": 0.5})
    live.manager.close()
    assert [r.run_id for r in prune_runs(root, older_than_s=0)] == ["live", "recent"]
    assert sorted(os.listdir(root)) == ["linked", "notes"]
    assert (tmp_path / "elsewhere").is_dir()

    again = _run(tmp_path, store, keyring, "old-a")  # a pruned run's id starts afresh
    assert again.manager.config.run_dir.is_dir()


@pytest.mark.parametrize("taken", ["restarted", "locked only"])
def test_prune_leaves_a_run_taken_after_it_was_listed(
    tmp_path, store, keyring, monkeypatch, taken
) -> None:
    import kasmina.manager.runs as runs
    from kasmina.utils.locks import lock_exclusive

    root = tmp_path / "runs"
    _run(tmp_path, store, keyring, "r1")
    _age(root / "r1", 3)
    holder = []
    remove = runs._remove

    def a_trainer_starts_first(*args):
        if taken == "restarted":  # a restart of the run: it holds its ledger, and writes
            config = make_config(tmp_path, store, run_id="r1", checkpoint_dir="")
            holder.append(Rig(config, keyring).manager)
        else:  # its lock taken, nothing written yet
            holder.append(lock_exclusive(root / "r1" / "nonces.log.lock"))
        return remove(*args)

    monkeypatch.setattr(runs, "_remove", a_trainer_starts_first)
    assert prune_runs(root, older_than_s=DAY) == []
    assert (root / "r1").is_dir()
    holder[0].close()


def test_a_run_with_no_lock_in_its_directory_is_pruned_only_when_asked(
    tmp_path, store, keyring
) -> None:
    """A live trainer whose ledger and checkpoints live elsewhere keeps only its checkpoint key
    in its run directory: no lock there to tell it is live. Judged by age alone, it was pruned
    under the live trainer."""
    root = tmp_path / "runs"
    config = make_config(
        tmp_path, store, run_id="elsewhere", nonce_ledger=str(tmp_path / "ledgers" / "e.log")
    )
    live = Rig(config, keyring)
    live.train(1)
    live.manager.end_epoch(0, {"val_accuracy": 0.5})
    assert sorted(os.listdir(root / "elsewhere")) == [".kasmina-run", "checkpoint.key"]
    _age(root / "elsewhere", 10)
    (info,) = list_runs(root)
    assert not info.in_use and not info.locked
    assert prune_runs(root, older_than_s=DAY) == [] and (root / "elsewhere").is_dir()
    live.manager.close()
    assert [r.run_id for r in prune_runs(root, older_than_s=DAY, unlocked=True)] == ["elsewhere"]


def test_a_restarted_trainer_holds_its_run_before_its_first_epoch(tmp_path, store, keyring) -> None:
    """A trainer restarted under its run id (to roll back to the last checkpoint, as the
    README says) with its nonce ledger elsewhere opened its checkpoint store, and took the
    run's lock, only at its first ``end_epoch``: until then the run was free to ``prune``, which
    deleted the checkpoints and key it was about to resume from."""
    root = tmp_path / "runs"

    def trainer() -> Rig:
        ledger = str(tmp_path / "ledgers" / "nonces.log")
        config = make_config(tmp_path, store, run_id="r1", checkpoint_dir="", nonce_ledger=ledger)
        return Rig(config, keyring)

    first = trainer()
    first.train(1)
    first.manager.end_epoch(0, {"val_accuracy": 0.5})
    first.manager.close()
    _age(root / "r1", 10)
    restarted = trainer()
    (info,) = list_runs(root)
    assert info.in_use
    assert prune_runs(root, older_than_s=DAY) == [] and (root / "r1").is_dir()
    assert restarted.manager.state.checkpoints.epochs() == [0]  # still there to roll back to
    restarted.manager.close()
    assert [r.run_id for r in prune_runs(root, older_than_s=0)] == ["r1"]


def test_a_restart_whose_nonce_ledger_moved_is_warned_of_replays(
    tmp_path, store, keyring, caplog
) -> None:
    """A restart configured with its ledger elsewhere (or off) than the run's own, which is
    there, accepted replays of the commands the run had accepted (a ROLLBACK included), and
    nothing said so. It still starts (the move may be meant), with a warning naming both."""
    first = _run(tmp_path, store, keyring, "r1")
    assert first.manager.config.nonce_ledger_path.is_file()
    moved = make_config(tmp_path, store, run_id="r1", nonce_ledger=str(tmp_path / "n.log"))
    with caplog.at_level("WARNING", logger="kasmina.manager.intake"):
        Rig(moved, keyring).manager.close()
    assert "recorded its commands' nonces in" in caplog.text and "n.log" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="kasmina.manager.intake"):
        Rig(make_config(tmp_path, store, run_id="r1"), keyring).manager.close()
    assert "recorded its commands' nonces" not in caplog.text  # the run's own ledger: quiet


def test_an_interrupted_prune_is_finished_by_the_next(tmp_path, store, keyring) -> None:
    root = tmp_path / "runs"
    _run(tmp_path, store, keyring, "r1")
    os.rename(root / "r1", root / ".pruning-r1-0000")  # renamed, then interrupted
    assert list_runs(root) == []
    assert prune_runs(root, keep=5) == [] and os.listdir(root) == []


def test_a_directory_that_holds_a_key_or_a_ledger_is_not_a_run(tmp_path, store, keyring) -> None:
    """A run whose key, ledger and checkpoints the user put in a directory of their own (the
    demo keeps its key beside its checkpoints, ``<out>/checkpoints/checkpoint.key``): a root
    given one level too high listed that directory as a run, and ``prune`` deleted it with
    every checkpoint and the key. Only a directory the manager marked as its run is one."""
    state = tmp_path / "out" / "state"
    config = make_config(
        tmp_path, store, run_id="r1", runs_root=str(tmp_path / "out" / "runs"),
        checkpoint_dir=str(state / "rank0"), checkpoint_key_file=str(state / "checkpoint.key"),
        nonce_ledger=str(state / "nonces.log"),
    )  # fmt: skip
    rig = Rig(config, keyring)
    rig.train(1)
    rig.manager.end_epoch(0, {"val_accuracy": 0.5})
    rig.manager.close()
    assert {"checkpoint.key", "nonces.log", "rank0"} <= set(os.listdir(state))
    _age(tmp_path / "out", 10)
    assert list_runs(tmp_path / "out") == []
    assert prune_runs(tmp_path / "out", keep=0, unlocked=True) == []
    assert (state / "checkpoint.key").is_file() and os.listdir(state / "rank0")
    assert not (tmp_path / "out" / "runs").exists()  # none of its files is there

    _run(tmp_path, store, keyring, "r2")  # a real run, copied under another name
    shutil.copytree(tmp_path / "runs" / "r2", tmp_path / "out" / "copied")
    assert [r.run_id for r in list_runs(tmp_path / "runs")] == ["r2"]
    assert list_runs(tmp_path / "out") == []


def test_a_run_of_a_version_before_the_marker_is_still_a_run(tmp_path, store, keyring) -> None:
    root = tmp_path / "runs"
    _run(tmp_path, store, keyring, "r1")
    (root / "r1" / ".kasmina-run").unlink()  # as an earlier version left it: its lock names it
    assert [r.run_id for r in list_runs(root)] == ["r1"]
    (root / "r1" / "checkpoints" / ".r1.checkpoints.lock").unlink()
    assert list_runs(root) == []  # a ledger and a key alone: not a run


@pytest.mark.parametrize("fails", ["rename", "delete"])
def test_a_run_that_cannot_be_removed_is_an_error_not_a_removal(
    tmp_path, store, keyring, monkeypatch, capsys, fails
) -> None:
    """A run the filesystem will not let go (a read-only root, an immutable file) was logged
    and counted as removed, half deleted or not at all, and ``kasmina runs prune`` exited 0."""
    import kasmina.manager.runs as runs
    from kasmina.manager.runs import PruneError

    root = tmp_path / "runs"
    for run_id in ("r1", "r2"):
        _run(tmp_path, store, keyring, run_id)
        _age(root / run_id, 3)
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst):
        if fails == "rename" and Path(src).name == "r1":
            raise PermissionError(1, "Operation not permitted", str(src))
        real_rename(src, dst)

    def rmtree(path, ignore_errors=False):
        if fails == "delete" and ".pruning-r1" in str(path):  # it deletes some of it, not all
            (Path(path) / "nonces.log").unlink(missing_ok=True)
            if not ignore_errors:
                raise PermissionError(1, "Operation not permitted", str(Path(path) / "checkpoints"))
            return
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(runs.os, "rename", rename)
    monkeypatch.setattr(runs.shutil, "rmtree", rmtree)
    with pytest.raises(PruneError, match="run r1") as info:
        prune_runs(root, older_than_s=DAY)
    assert [r.run_id for r in info.value.removed] == ["r2"]
    assert [r.run_id for r, _ in info.value.failed] == ["r1"]
    (left,) = [n for n in os.listdir(root) if "r1" in n]  # not removed, or not all of it
    assert left == "r1" if fails == "rename" else left.startswith(".pruning-r1-")
    assert (root / left / "checkpoint.key").is_file()

    _run(tmp_path, store, keyring, "r3")
    _age(root / "r3", 3)
    rc, out, err = run(capsys, "runs", "prune", "--runs-root", str(root), "--older-than", "1")
    assert rc == (1 if fails == "rename" else 0), err
    assert out.startswith("r3") and "removed 1 run(s)" in err
    if fails == "rename":
        # The reason says "not removed" itself: "run r1 not removed: not removed: ...".
        assert "kasmina: error: run r1: not removed: [Errno 1] Operation not permitted" in err


def test_prune_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="removes nothing by default"):
        prune_runs("unused")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="older_than_s"):
            prune_runs("unused", older_than_s=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep"):
            prune_runs("unused", keep=bad)  # type: ignore[arg-type]
    assert list_runs("no/such/root") == [] and prune_runs("no/such/root", keep=0) == []


def test_the_cli_lists_and_prunes(tmp_path, store, keyring, capsys) -> None:
    root = tmp_path / "runs"
    _run(tmp_path, store, keyring, "r1")
    _run(tmp_path, store, keyring, "r2")
    _age(root / "r1", 2)
    rc, out, err = run(capsys, "runs", "list", "--runs-root", str(root))
    assert rc == 0 and out.splitlines()[0].startswith("r2") and "2 run(s)" in err
    rc, out, err = run(capsys, "runs", "prune", "--runs-root", str(root), "--older-than", "1")
    assert rc == 0 and out.startswith("r1") and "removed 1 run(s)" in err
    assert os.listdir(root) == ["r2"]
    rc, out, err = run(
        capsys, "runs", "prune", "--runs-root", str(root), "--keep", "0", "--dry-run"
    )
    assert rc == 0 and "would remove 1 run(s)" in err and os.listdir(root) == ["r2"]
    assert_one_line_error(*run(capsys, "runs", "prune", "--runs-root", str(root))[::2], "--keep")
    for days in ("-1", "1e308"):  # 1e308 days overflow as seconds: named by the flag, as -1
        rc, _, err = run(capsys, "runs", "prune", "--older-than", days)
        assert rc == 2 and "--older-than: expected a finite number of days" in err
