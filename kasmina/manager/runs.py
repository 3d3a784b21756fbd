"""Run directories: what earlier runs left under ``runs_root``, and pruning them.

Every manager keeps its state in ``<runs_root>/<run_id>/`` (``KasminaConfig.run_dir``): the nonce
ledger, its epoch and emergency checkpoints, the checkpoint key. Nothing removes a run's
directory when the run ends (a trainer restarted with the run's id resumes from it), so under
the default root, in the user's cache, they add up run after run, a few model-sized checkpoints
each. ``list_runs`` says what is there and ``prune_runs`` (``kasmina runs list|prune``) removes
the runs a user no longer needs, by age (``older_than_s``) and count (``keep`` the newest).

What counts as a run: a directory directly under the root whose name is a run id and that holds
the run marker ``.kasmina-run`` with that id in it (``mark_run_dir``: the manager writes it
before any of the run's files), or, from a run of a version before the marker, the checkpoint
store's lock named after the run (``checkpoints/.<run_id>.checkpoints.lock``). A ledger or a
key alone does not make a run: a user's ``checkpoint_key_file`` or ``nonce_ledger`` may sit in
a directory of their own (the demo keeps its key beside its checkpoints), which a root given
one level too high then listed as a run, and pruned with every checkpoint in it. A root given
by mistake (a home directory) loses nothing but runs. Symlinks are never followed.

A run is in use while a trainer holds one of its locks (the ledger's, the checkpoint store's:
``flock`` locks, dropped when their process dies, so a crashed run is not in use). Pruning takes
every lock a run has, without waiting, and leaves the run alone if any is held; holding them, it
renames the directory out of the way (atomic: a trainer that opens the run from then on starts
afresh) and deletes it. A run that cannot be removed whole (a permission, an immutable file)
is not counted as removed: ``prune_runs`` goes on with the others and then raises
``PruneError``, naming each such run and what stopped it. A run directory with no lock in it
tells nothing of its trainer (one whose ledger and checkpoints live elsewhere still keeps its
checkpoint key here), so it is left unless ``unlocked`` asks for such runs too, judged by age
alone. A run's age is that of its newest file. Listing takes each lock for an instant too: a
trainer of that run starting in that instant is refused as if a second trainer held it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from kasmina.errors import KasminaError
from kasmina.manager.config import CHECKPOINT_LOCK_SUFFIX, RUN_ID_PATTERN, KasminaConfig
from kasmina.utils.atomic import install_new_file
from kasmina.utils.checks import check_int, check_non_negative
from kasmina.utils.files import read_regular_file
from kasmina.utils.locks import lock_exclusive

logger = logging.getLogger(__name__)

__all__ = ["PruneError", "RunInfo", "list_runs", "mark_run_dir", "prune_runs"]

# Renamed here (under the root) while being deleted; never listed as a run.
_TRASH_PREFIX = ".pruning-"
# The file that marks a directory as a run's, holding its run id (``mark_run_dir``).
RUN_MARKER_NAME = ".kasmina-run"


@dataclass(frozen=True)
class RunInfo:
    """One run directory: its id, path, bytes on disk (its files' sizes), when its newest file
    was written (seconds since the epoch), whether a trainer holds one of its locks, and
    whether it has any."""

    run_id: str
    path: Path
    size_bytes: int
    modified: float
    in_use: bool
    locked: bool = True  # it has a lock file (a run with none tells nothing of its trainer)


class PruneError(KasminaError):
    """Some runs ``prune_runs`` chose could not be removed whole. ``removed``: the runs it did
    remove; ``failed``: ``(run, reason)`` for each of the others (one renamed out of the way
    but not fully deleted is there, ``.pruning-*``, until a later prune finishes it)."""

    def __init__(self, removed: list[RunInfo], failed: list[tuple[RunInfo, str]]) -> None:
        self.removed, self.failed = removed, failed
        what = "; ".join(f"run {info.run_id}: {reason}" for info, reason in failed)
        super().__init__(f"{len(failed)} run(s) could not be removed: {what}")


def mark_run_dir(config: KasminaConfig) -> None:
    """Write ``config.run_dir``'s run marker (the run id) if any of the run's files (its
    ledger, checkpoint key or checkpoint directories) is to live there and it has none yet,
    before any of them is written. A marker that cannot be written is logged and training
    goes on: the run is then just not one ``kasmina runs`` lists."""
    run_dir, ledger = config.run_dir, config.nonce_ledger_path
    own = [Path(d).expanduser() for d in (config.checkpoint_dir, config.emergency_checkpoint_dir)]
    own += [config.checkpoint_key_path] + ([] if ledger is None else [ledger])
    marker = run_dir / RUN_MARKER_NAME
    if not any(p.is_relative_to(run_dir) for p in own) or _is_marked(run_dir):
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        install_new_file(marker, f"{config.run_id}\n".encode())
    except OSError as exc:
        logger.warning("run %s: its marker %s cannot be written: %s", config.run_id, marker, exc)


def _is_marked(path: Path) -> bool:
    """``path`` holds a run marker naming it (a regular file, read without following links)."""
    marker = path / RUN_MARKER_NAME
    if not stat.S_ISREG(_lstat_mode(marker)):
        return False
    try:
        data, _ = read_regular_file(marker, 128, what="run marker")
    except (OSError, ValueError):  # gone, unreadable, or not a marker Kasmina wrote
        return False
    return data.strip() == path.name.encode()


def _is_run(path: Path) -> bool:
    legacy = path / "checkpoints" / f".{path.name}{CHECKPOINT_LOCK_SUFFIX}"
    return _is_marked(path) or stat.S_ISREG(_lstat_mode(legacy))


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def _walk(path: Path) -> tuple[int, float, list[Path]]:
    """``(bytes, newest mtime, lock files)`` of the tree at ``path``, links not followed."""
    size, newest, locks = 0, os.lstat(path).st_mtime, []
    for folder, dirs, files in os.walk(path, followlinks=False):
        for name in dirs + files:
            entry = Path(folder, name)
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                info = os.lstat(entry)
                newest = max(newest, info.st_mtime)
                if stat.S_ISREG(info.st_mode):
                    size += info.st_size
                    if name.endswith(".lock"):
                        locks.append(entry)
    return size, newest, locks


def _take_locks(locks: list[Path]) -> list[io.FileIO] | None:
    """Every lock in ``locks``, held; None (none held) if a trainer holds any of them."""
    held: list[io.FileIO] = []
    for path in locks:
        try:
            lock_file = lock_exclusive(path)
        except FileNotFoundError:
            continue  # removed meanwhile: nobody holds it
        except OSError:
            lock_file = None  # not a regular file: not ours to judge, so the run is left
        if lock_file is None:
            for other in held:
                other.close()
            return None
        held.append(lock_file)
    return held


def _runs(root: Path) -> list[tuple[RunInfo, list[Path]]]:
    found = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    for entry in entries:
        path = Path(entry.path)
        if not (RUN_ID_PATTERN.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
            continue
        if not _is_run(path):
            continue
        try:
            size, modified, locks = _walk(path)
        except FileNotFoundError:
            continue  # pruned meanwhile
        held = _take_locks(locks)
        for lock_file in held or ():
            lock_file.close()
        info = RunInfo(entry.name, path, size, modified, held is None, bool(locks))
        found.append((info, locks))
    return found


def list_runs(runs_root: str | os.PathLike[str]) -> list[RunInfo]:
    """The runs under ``runs_root``, newest first (an absent root holds none)."""
    runs = [info for info, _ in _runs(Path(runs_root).expanduser())]
    return sorted(runs, key=lambda r: r.modified, reverse=True)


def prune_runs(
    runs_root: str | os.PathLike[str],
    *,
    older_than_s: float | None = None,
    keep: int | None = None,
    dry_run: bool = False,
    unlocked: bool = False,
    now: float | None = None,
) -> list[RunInfo]:
    """Remove the runs under ``runs_root`` that no trainer uses, that are not among the ``keep``
    newest, and whose newest file is at least ``older_than_s`` old (each criterion given must
    hold; at least one must be given); a run with no lock file only with ``unlocked``. Returns
    the runs removed (with ``dry_run``: that would be), newest first. A run whose locks cannot
    all be taken now is left, and so is one that changed since it was listed."""
    if older_than_s is None and keep is None:
        raise ValueError("give older_than_s, keep or both: prune_runs removes nothing by default")
    if older_than_s is not None:  # True was 1 s: every run but the last second's was old
        older_than_s = check_non_negative("older_than_s", older_than_s)
    if keep is not None:
        keep = check_int("keep", keep, 0)
    root = Path(runs_root).expanduser()
    now = time.time() if now is None else now
    runs = sorted(_runs(root), key=lambda r: r[0].modified, reverse=True)
    chosen = [
        (info, locks)
        for i, (info, locks) in enumerate(runs)
        if (keep is None or i >= keep)
        and (older_than_s is None or now - info.modified >= older_than_s)
        and not info.in_use
        and (info.locked or unlocked)
    ]
    if dry_run:
        return [info for info, _ in chosen]
    _clear_trash(root)
    removed: list[RunInfo] = []
    failed: list[tuple[RunInfo, str]] = []
    for info, locks in chosen:
        outcome = _remove(root, info, locks)
        if outcome is True:
            removed.append(info)
        elif outcome:  # why it could not be removed whole
            failed.append((info, outcome))
    if failed:
        raise PruneError(removed, failed)
    return removed


def _clear_trash(root: Path) -> None:
    """Delete what an interrupted prune renamed out of the way and did not finish deleting."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if entry.name.startswith(_TRASH_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def _remove(root: Path, info: RunInfo, locks: list[Path]) -> bool | str:
    """True: removed; False: left (in use, or written since it was listed); a string: it
    could not be removed whole, and why."""
    held = _take_locks(locks)
    if held is None:
        logger.info("run %s is in use now; left", info.run_id)
        return False
    try:
        if _walk(info.path)[1] != info.modified:  # written since it was listed
            logger.info("run %s changed since it was listed; left", info.run_id)
            return False
        trash = root / f"{_TRASH_PREFIX}{info.run_id}-{secrets.token_hex(4)}"
        os.rename(info.path, trash)
        shutil.rmtree(trash, ignore_errors=True)  # as much as it can
        if os.path.lexists(trash):
            try:  # again, for what stopped it
                shutil.rmtree(trash)
            except OSError as exc:
                return f"renamed to {trash} but not fully deleted: {exc}"
        return True
    except OSError as exc:
        return f"not removed: {exc}"
    finally:
        for lock_file in held:
            lock_file.close()
