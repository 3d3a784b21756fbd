"""Epoch checkpoints on a cadence, tamper-evident on disk, and the capture/restore pair behind a
rollback.

Why signed: a checkpoint is trusted state; a rollback writes it into the live model. A flipped
bit used to load silently (one rolled a weight to -4.9e37 while the rollback reported success).
The disk store writes every file through the run's ``CheckpointSigner`` (``utils.state_io``: a
manifest with the payload's SHA-256 and size, the epoch and the run id, HMAC'd with the run's
key), and reads nothing that does not verify: ``CheckpointIntegrityError``, and the rollback,
which loads in its first phase, changes nothing.

Why a cadence and a reach: a full model + optimizers checkpoint per epoch is the caller's
decision, not a default cost. ``end_epoch(n)`` writes when ``n % every_epochs == 0``, and
writing epoch n deletes the checkpoints older than ``n - max_rollback_epochs``; so at most
``max_rollback_epochs // every_epochs + 1`` are kept. The store is chosen by
``checkpoint_mode``: signed files (``"disk"``), CPU deep copies (``"memory"``, for small models),
or none (``"off"``, a rollback is refused with that reason).

Why run-scoped names: the files are ``<run_id>.epoch_<n>.ckpt``, and listing, rotation and
cleanup only ever touch names of this run in this run's directory, so runs that share a
directory never see, rotate or delete each other's checkpoints (and would refuse to load them:
the run id is signed). Two live trainers of one run, though, would write the same names, so the
run's disk store (``open_checkpoint_store``) holds an exclusive lock while it is open, in the
checkpoint directory and named after the run (``.<run_id>.checkpoints.lock``), and a second one
is refused: give each trainer, each rank of a multi-process run included, its own ``run_id``
(or ``checkpoint_dir``).

What a checkpoint holds is captured and restored by ``kasmina.manager.training_state``.
"""

from __future__ import annotations

import io
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kasmina.errors import CheckpointUnavailableError
from kasmina.isolation.monitor import emergency_names
from kasmina.manager.config import CHECKPOINT_LOCK_SUFFIX, KasminaConfig
from kasmina.utils.atomic import fsync_directory, remove_stale_temporaries
from kasmina.utils.checks import check_int
from kasmina.utils.locks import lock_exclusive, require_held
from kasmina.utils.state_io import CheckpointSigner, clone_state

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointStore",
    "DiskCheckpointStore",
    "MemoryCheckpointStore",
    "NoCheckpointStore",
    "checkpoint_lock_path",
    "open_checkpoint_store",
]

CHECKPOINT_FORMAT = 1


def _check_epoch(epoch: object) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
    return epoch


class CheckpointStore(ABC):
    """Epoch checkpoints on a cadence, with a bounded reach back (see the module docstring).

    Subclasses keep the checkpoints (``_write``, ``_read``, ``_delete``, ``epochs``); this class
    decides which epochs are due, which are kept, and what a refusal says. Saving epoch ``n``
    first removes checkpoints of epochs after ``n`` (after a rollback, all those after its
    target): they belong to a timeline that a rollback abandoned, and keeping them would make
    ``latest_epoch`` point at stale state; deleting them before the write means no crash
    leaves them beside the new epoch as one history (``_drop_abandoned``). Which of the
    kept checkpoints are abandoned is known only after a rollback (``abandon_after``) or a save
    in this process: until then every checkpoint of the run is live, and ``check_next_epoch``
    refuses an epoch whose save would delete one (a trainer restarted with the same run id).
    """

    mode = ""

    def __init__(
        self,
        *,
        every_epochs: int = 1,
        max_rollback_epochs: int = 5,
        run_id: str = "",
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.every_epochs = check_int("every_epochs", every_epochs, 1)
        self.max_rollback_epochs = check_int("max_rollback_epochs", max_rollback_epochs, 0)
        self.run_id = run_id
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._announced = False
        # The last epoch of the live timeline, set by a save or a rollback: the checkpoints
        # after it are an abandoned timeline's. None: every checkpoint of the run is live.
        self._abandoned_after: int | None = None
        # The epoch a save began writing. A boundary that stops after its checkpoint is written
        # (a Ctrl-C) has not ended its epoch: its retry may write that checkpoint again.
        self._writing: int | None = None

    # ------------------------------------------------------------------ policy
    def is_due(self, epoch: int) -> bool:
        """Whether ``end_epoch(epoch)`` writes a checkpoint."""
        return _check_epoch(epoch) % self.every_epochs == 0

    @abstractmethod
    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint, ascending."""

    def latest_epoch(self) -> int | None:
        epochs = self.epochs()
        return epochs[-1] if epochs else None

    @property
    def abandoned_after(self) -> int | None:
        """The last epoch of the live timeline a rollback left (None: every checkpoint is)."""
        return self._abandoned_after

    def follow_timeline(
        self,
        abandoned_after: int | None,
        kept: Sequence[int] | None = None,
        latest: tuple[int, Mapping[str, Any]] | None = None,
        since: int | None = None,
    ) -> None:
        """Take another store's timeline: a rank repaired from another holds that rank's state
        (a rollback applied there and not here, or the reverse, or a state of its own that
        diverged), so its checkpoints past ``abandoned_after`` belong to a timeline it left.
        With ``kept`` (the other's epochs), it also deletes its own of any other epoch, of an
        epoch from ``since`` on (written while it had diverged) and of ``latest``'s epoch, then
        writes ``latest`` (the other's checkpoint of that epoch, written before the sync found
        them apart): a later ROLLBACK restores on it what it restores on the others, or is
        refused there. A failure is logged: the state is repaired, and a checkpoint deleted
        and not written is refused, never restored wrong."""
        after = abandoned_after
        self._abandoned_after = None if after is None else _check_epoch(after)
        if kept is None:
            return
        own = self.epochs()
        stale = [
            e
            for e in own
            if e not in kept or (since is not None and e >= since) or (latest and e == latest[0])
        ]
        try:
            for epoch in reversed(stale):
                self._delete(epoch)
            if stale:
                self._sync_deletes()
            if latest is not None and latest[0] in kept:
                self._write(*latest)
        except OSError:
            logger.exception("a repaired rank could not take its source's checkpoints")

    def abandon_after(self, epoch: int) -> None:
        """A rollback took the run back to ``epoch``: the checkpoints after it belong to the
        timeline it left, which the next save deletes (``check_next_epoch`` allows that)."""
        self._abandoned_after = _check_epoch(epoch)

    def check_next_epoch(self, epoch: int, last_ended: int) -> None:
        """``ValueError`` unless ``end_epoch(epoch)`` goes forward: after ``last_ended`` (the
        manager's clock) and after every live checkpoint of this run. Saving ``epoch`` deletes
        the checkpoints after it, and a trainer restarted with the run's id starts its clock
        again; only a rollback (``abandon_after``) gives up the checkpoints after its target."""
        _check_epoch(epoch)
        if epoch <= last_ended:
            raise ValueError(f"epoch {epoch} is not after the last epoch ended ({last_ended})")
        after = self._abandoned_after
        live = [e for e in self.epochs() if e >= epoch and (after is None or e <= after)]
        if live == [self._writing] == [epoch]:  # written by this store, its epoch never ended
            return
        if live:
            raise ValueError(
                f"epoch {epoch} is not after this run's checkpoints of epochs {live} (run "
                f"{self.run_id or '-'}, {self.describe()}): ending it would overwrite or delete "
                f"them. To resume the run, roll back (a signed ROLLBACK, to epoch {live[-1]} "
                "for the latest) and go on from there; to start a new run, use a new run_id"
            )

    def save(self, epoch: int, state: Mapping[str, Any]) -> None:
        """Keep ``state`` as the checkpoint of ``epoch`` (whether or not it is due: the caller
        decides), then apply retention. The abandoned timeline's checkpoints are deleted, for
        good, before the write (``_drop_abandoned``); a failed write leaves the others as they
        were."""
        _check_epoch(epoch)
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoint state must be a mapping, got {type(state).__name__}")
        if not self._announced:  # once per run: where its state goes, before the first write
            self._announced = True
            logger.info(
                "run %s (run directory %s): %s checkpoints every %d epoch(s), reaching %d "
                "epoch(s) back",
                self.run_id or "-",
                self.run_dir or "-",
                self.describe(),
                self.every_epochs,
                self.max_rollback_epochs,
            )
        self._drop_abandoned(epoch)  # first: no crash may leave them beside the new epoch
        self._writing = epoch  # before: the write may be done when an interrupt lands in it
        self._write(epoch, state)
        self._abandoned_after = epoch  # what is after it was dropped above, or left behind
        self._prune(epoch)

    def load(self, epoch: int, map_location: Any = None) -> dict[str, Any]:
        """The checkpoint of ``epoch``; ``CheckpointUnavailableError`` (naming the nearest kept
        epochs) when there is none."""
        _check_epoch(epoch)
        if epoch not in self.epochs():
            raise self.unavailable(epoch)
        return self._read(epoch, map_location)

    def describe(self) -> str:
        """Where the checkpoints are kept, for messages."""
        return self.mode

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release what the store holds beyond its checkpoints (the disk store: its lock)."""

    def unavailable(self, epoch: int) -> CheckpointUnavailableError:
        """The refusal for a missing ``epoch``: the cadence, the reach, the nearest kept."""
        have = self.epochs()
        below = [e for e in have if e < epoch]
        above = [e for e in have if e > epoch]
        nearest = below[-1:] + above[:1]
        policy = (
            f"checkpoints are written every {self.every_epochs} epoch(s) and kept "
            f"{self.max_rollback_epochs} epoch(s) back"
        )
        kept = (
            f"nearest kept: epoch {' and '.join(str(e) for e in nearest)}"
            if nearest
            else f"none kept yet of run {self.run_id!r} in the {self.describe()} store"
        )
        return CheckpointUnavailableError(f"no checkpoint of epoch {epoch} ({policy}); {kept}")

    # ------------------------------------------------------------------ storage
    @abstractmethod
    def _write(self, epoch: int, state: Mapping[str, Any]) -> None:
        """Keep ``state`` for ``epoch``, all or nothing."""

    @abstractmethod
    def _read(self, epoch: int, map_location: Any) -> dict[str, Any]:
        """The kept state of ``epoch`` (which exists), verified where it can have changed."""

    @abstractmethod
    def _delete(self, epoch: int) -> None:
        """Forget the checkpoint of ``epoch``."""

    def _sync_deletes(self) -> None:  # noqa: B027 - only a disk store has deletes to persist
        """Make the deletes done so far durable before anything else is written."""

    def _drop_abandoned(self, epoch: int) -> None:
        """Before ``epoch`` is written, delete the checkpoints of the timeline a rollback left
        (after its target, ``abandon_after``; with none known, those after ``epoch``), newest
        first, and make that durable (``_sync_deletes``). Why first and in that order: a crash
        at any point then leaves a prefix of one timeline on disk, never the new epoch beside
        the old timeline's later ones, which a restart would take for one history and be told
        to roll back into. A failed delete raises and nothing is written."""
        after = self._abandoned_after
        abandoned = [e for e in self.epochs() if e > epoch or (after is not None and e > after)]
        for old in reversed(abandoned):
            try:
                self._delete(old)
            except OSError as exc:
                raise OSError(
                    f"could not delete the abandoned checkpoint of epoch {old} ({exc}); epoch "
                    f"{epoch} is not written, since it would sit beside the timeline it replaces"
                ) from exc
        if abandoned:
            self._sync_deletes()
            logger.info("removed checkpoints of abandoned epochs %s", abandoned)

    def _prune(self, saved_epoch: int) -> None:
        """Delete epochs out of reach (and any after ``saved_epoch``, which ``_drop_abandoned``
        already removed unless another writer raced it). Failures are logged, not raised: the
        checkpoint is written, and a leftover is only disk. The listing too: a raise there would
        fail ``end_epoch`` after its write, and its retry would be refused (the epoch is kept)."""
        try:
            epochs = self.epochs()
        except OSError:
            logger.warning(
                "could not list the checkpoints to prune after epoch %d", saved_epoch, exc_info=True
            )
            return
        later = [e for e in epochs if e > saved_epoch]
        expired = [e for e in epochs if e < saved_epoch - self.max_rollback_epochs]
        for epoch in later + expired:
            try:
                self._delete(epoch)
            except OSError:
                logger.warning("could not delete the checkpoint of epoch %d", epoch, exc_info=True)


class DiskCheckpointStore(CheckpointStore):
    """Signed checkpoint files ``<run_id>.epoch_<n>.ckpt`` in ``directory``.

    Only names of this run are ever listed, loaded, rotated or cleaned up, so a directory shared
    with other runs is safe; loading verifies the file (``CheckpointSigner.read``) before a byte
    reaches ``torch.load``. With ``lock_path`` (a run's store: ``open_checkpoint_store``), an
    exclusive advisory lock on that file (``kasmina.utils.locks``) is taken when the store is
    built and held until ``close``, until the store is collected, or until the process ends (a
    restart after a crash is never blocked): a second store with the same ``lock_path``, in
    another process or in this one, is refused with ``RuntimeError``.
    """

    mode = "disk"

    def __init__(
        self,
        directory: str | os.PathLike[str],
        signer: CheckpointSigner,
        *,
        every_epochs: int = 1,
        max_rollback_epochs: int = 5,
        run_dir: str | os.PathLike[str] | None = None,
        lock_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            every_epochs=every_epochs,
            max_rollback_epochs=max_rollback_epochs,
            run_id=signer.run_id,
            run_dir=run_dir,
        )
        self.directory = Path(directory).expanduser()
        self.signer = signer
        self._lock_file = None if lock_path is None else self._lock(Path(lock_path).expanduser())
        # Only the spelling ``path_for`` writes (8 digits, more without a leading zero): another
        # (a copy renamed ``epoch_000000007``) is not a checkpoint this store can read or delete.
        self._final = rf"{re.escape(signer.run_id)}\.epoch_(\d{{8}}|[1-9]\d{{8,}})\.ckpt"
        self._name = re.compile(self._final)
        self._remove_stale_temporaries()

    def path_for(self, epoch: int) -> Path:
        return self.directory / f"{self.run_id}.epoch_{_check_epoch(epoch):08d}.ckpt"

    def describe(self) -> str:
        return f"signed disk ({self.directory})"

    def close(self) -> None:
        """Release the lock, if any (another trainer of the run may start)."""
        if self._lock_file is not None:
            self._lock_file.close()

    def _lock(self, lock_path: Path) -> io.FileIO:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = lock_exclusive(lock_path)
        if lock_file is None:
            run_id = self.run_id
            raise RuntimeError(
                f"the checkpoints of run {run_id} in {self.directory} are held by another live "
                f"trainer (another process of this run, or a second manager in this one; lock "
                f"{lock_path}): both would write {run_id}.epoch_<n>.ckpt there. A restart of "
                "this run waits until that trainer has closed or exited; two trainers, each "
                "rank included, each need its own run_id or checkpoint_dir (not a nonce_ledger)"
            )
        return lock_file

    def epochs(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = self._name.fullmatch(entry.name)
            if match and entry.is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def _write(self, epoch: int, state: Mapping[str, Any]) -> None:
        require_held(self._lock_file, f"the checkpoints in {self.directory}")
        path = self.signer.write(dict(state), self.path_for(epoch), kind="epoch", epoch=epoch)
        logger.info("checkpoint for epoch %d written to %s", epoch, path)

    def _read(self, epoch: int, map_location: Any) -> dict[str, Any]:
        state = self.signer.read(
            self.path_for(epoch), kind="epoch", epoch=epoch, map_location=map_location
        )
        if not isinstance(state, dict):
            raise ValueError(f"the checkpoint of epoch {epoch} holds no state mapping")
        return state

    def _delete(self, epoch: int) -> None:
        require_held(self._lock_file, f"the checkpoints in {self.directory}")
        self.path_for(epoch).unlink(missing_ok=True)

    def _sync_deletes(self) -> None:
        fsync_directory(self.directory)

    def _remove_stale_temporaries(self) -> None:
        """This run's temp files left by a crash mid-write (``.<final name>.<random>.tmp``)
        are garbage: the target was never replaced. Other runs' files are not this run's to
        judge. All of them at once: the only writer of this run's names is the store, and the
        run's store is one (its lock)."""
        remove_stale_temporaries(self.directory, self._final, older_than_s=None)


class MemoryCheckpointStore(CheckpointStore):
    """Checkpoints kept in this process's RAM as deep copies on the CPU, for small models.

    Nothing touches the disk, so nothing needs signing: the snapshots never leave the process.
    Both directions copy (``save`` and ``load``), so neither later training nor a restored
    optimizer can alias, and mutate, a kept snapshot.
    """

    mode = "memory"

    def __init__(
        self,
        *,
        every_epochs: int = 1,
        max_rollback_epochs: int = 5,
        run_id: str = "",
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            every_epochs=every_epochs,
            max_rollback_epochs=max_rollback_epochs,
            run_id=run_id,
            run_dir=run_dir,
        )
        self._snapshots: dict[int, dict[str, Any]] = {}

    def epochs(self) -> list[int]:
        return sorted(self._snapshots)

    def _write(self, epoch: int, state: Mapping[str, Any]) -> None:
        self._snapshots[epoch] = clone_state(dict(state), device="cpu")

    def _read(self, epoch: int, map_location: Any) -> dict[str, Any]:
        return clone_state(self._snapshots[epoch], device=map_location or "cpu")

    def _delete(self, epoch: int) -> None:
        self._snapshots.pop(epoch, None)


class NoCheckpointStore(CheckpointStore):
    """``checkpoint_mode="off"``: nothing is ever due or kept, and a load says why."""

    mode = "off"
    REASON = 'checkpoint_mode is "off": this run keeps no checkpoints, so it cannot roll back'

    def is_due(self, epoch: int) -> bool:
        _check_epoch(epoch)
        return False

    def epochs(self) -> list[int]:
        return []

    def unavailable(self, epoch: int) -> CheckpointUnavailableError:
        return CheckpointUnavailableError(f"no checkpoint of epoch {epoch}: {self.REASON}")

    def _write(self, epoch: int, state: Mapping[str, Any]) -> None:
        raise CheckpointUnavailableError(self.REASON)

    def _read(self, epoch: int, map_location: Any) -> dict[str, Any]:
        raise self.unavailable(epoch)

    def _delete(self, epoch: int) -> None:
        """Nothing is ever kept, so there is nothing to forget."""


def checkpoint_lock_path(config: KasminaConfig) -> Path:
    """The lock file of this run's disk checkpoints: in the checkpoint directory itself, named
    after the run, so two trainers of one run that write checkpoints to the same place meet on
    it wherever their run directories are (one per node, a shared checkpoint directory), and
    two that write them to different places do not."""
    return Path(config.checkpoint_dir).expanduser() / f".{config.run_id}{CHECKPOINT_LOCK_SUFFIX}"


def open_checkpoint_store(config: KasminaConfig, signer: CheckpointSigner) -> CheckpointStore:
    """The store ``config.checkpoint_mode`` asks for, with its cadence and reach; on disk, it
    holds the run's checkpoint lock (``checkpoint_lock_path``) while open. Temp files of this
    run's killed emergency writes, older than ``STALE_TEMPORARY_S``, are removed first."""
    policy: dict[str, Any] = {
        "every_epochs": config.checkpoint_every_epochs,
        "max_rollback_epochs": config.max_rollback_epochs,
        "run_dir": config.run_dir,
    }
    # A killed emergency write's temp file holds seed state: removed once no writer can own it.
    emergency = emergency_names(f"{config.run_id}.", ".ckpt")
    remove_stale_temporaries(Path(config.emergency_checkpoint_dir).expanduser(), emergency)
    if config.checkpoint_mode == "disk":
        lock = checkpoint_lock_path(config)
        return DiskCheckpointStore(config.checkpoint_dir, signer, lock_path=lock, **policy)
    if config.checkpoint_mode == "memory":
        return MemoryCheckpointStore(run_id=config.run_id, **policy)
    return NoCheckpointStore(run_id=config.run_id, **policy)
