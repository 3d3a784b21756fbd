"""The kernel manager as a ``DistributedCoordinator`` sees it: a replica to compare and repair,
and an applier for the commands the ranks agreed on.

- ``ManagerReplica`` is what ranks compare bit for bit (state table, seeds, optimizers, the
  step and epoch counters, and by default the host) and how a divergent rank is repaired: the
  majority's rollback snapshot, loaded through the rollback's all-or-nothing restore;
- ``ManagerApplier`` prepares relayed commands (a GERMINATE's kernel fetched on every rank
  before the ranks agree) and applies the agreed ones at the sync, through the manager's
  command intake.

Each holds the parts of the manager it works on (its state and guard; its intake and report),
not the manager. ``kasmina.manager.ddp.DistributedKasmina`` builds both for a manager.
"""

from __future__ import annotations

import io
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, wait
from typing import Any

import torch

from kasmina.control.commands import KasminaCommand
from kasmina.control.relay import EpochSyncResult
from kasmina.control.replica import nested_checksum, nested_finite
from kasmina.isolation.optimizers import HOST_ID
from kasmina.leyline import SeedOperation
from kasmina.manager.checkpoints import CHECKPOINT_FORMAT, MemoryCheckpointStore
from kasmina.manager.guard import IsolationGuard
from kasmina.manager.intake import CommandIntake
from kasmina.manager.report import ManagerReport
from kasmina.manager.rollback import fetches_bounded, restore_epoch, snapshot
from kasmina.manager.state import ManagerState
from kasmina.manager.tracked import writers_of
from kasmina.utils.grad_modes import training_tensors
from kasmina.utils.locks import fork_safe

logger = logging.getLogger(__name__)

__all__ = ["PREPARE_SHARE", "ManagerApplier", "ManagerReplica"]

# The share of the process group's timeout that a sync's command prepares (kernel fetches) may
# take on one rank, while the other ranks wait for its answer in a collective.
PREPARE_SHARE = 0.5
_PREPARE_SHARE_TEXT = (
    "the prepares of one sync may take, the share of the process group's timeout they get: "
    "the other ranks wait for this one in a collective"
)
_GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE


class ManagerReplica:
    """A kernel manager's replicated state, as the coordinator checks and repairs it.

    The checksum covers the state table, every seed's state (kernel weights, alpha, the fields
    of its extra state), its record (artifact, grafting steps), every optimizer's state, the
    epoch and step counters, and with ``include_host`` the host's parameters (DDP keeps them
    equal, but nothing else would notice a rank whose host weights were corrupted; off, a
    large host is not copied to the CPU at every epoch boundary). A repair sends the manager's
    rollback snapshot (``torch.save``; read back with ``weights_only=True``, which loads
    tensors and plain containers only) and loads it with the rollback's restore, which
    re-attaches the kernels the source holds, rebuilds the optimizers, loads the tracked
    objects (``manager.track``; not checksummed) and changes nothing if any part fails.
    Snapshot and repair run under ``lock``, the manager's: a ``close()`` or a command on
    another thread waits for them, and a closed manager is not repaired (``RuntimeError``).
    """

    def __init__(
        self,
        state: ManagerState,
        guard: IsolationGuard,
        *,
        lock: threading.RLock,
        include_host: bool = True,
        fetch_timeout_s: float | None = None,
    ) -> None:
        self.state = state
        self.guard = guard
        self.lock = lock
        self.include_host = include_host
        self.fetch_timeout_s = fetch_timeout_s  # a repair's kernel fetches (None: unbounded)
        self.diverged_since: int | None = None  # ``note_sync``

    def checksum(self) -> int:
        return nested_checksum(self._view())

    def healthy(self) -> bool:
        """Whether every floating tensor the checksum covers is finite (``ReplicaState``): a
        rank whose seed's BatchNorm statistics a batch of inf made NaN is repaired from a
        finite rank, never taken as the one to copy, even in a two-rank tie."""
        return nested_finite(self._view())

    def _view(self) -> dict[str, Any]:
        state = self.state
        registry = state.require_registry()
        optimizers = state.optimizers.state_dict()["optimizers"]
        if not self.include_host:
            optimizers = {k: v for k, v in optimizers.items() if k != HOST_ID}
        view: dict[str, Any] = {
            "table": registry.table.state_tensor,
            "seeds": {r.seed_id: r.seed.state_dict() for r in registry},
            "records": {r.seed_id: (r.artifact_id or "", r.graft_steps) for r in registry},
            "optimizers": optimizers,
            "clock": (state.epoch, state.global_step),
        }
        if self.include_host:  # registered, added by a param group, unfrozen since
            view["host"] = registry.all_host_params()
        return view

    def note_sync(self, result: EpochSyncResult) -> None:
        """After each sync: a rank found apart and not repaired writes checkpoints of its own
        timeline from that epoch on (``diverged_since``), which its next repair deletes."""
        if result.diverged and result.rank not in result.repaired_ranks:
            since = self.diverged_since
            self.diverged_since = result.epoch if since is None else min(since, result.epoch)
        else:
            self.diverged_since = None

    def export_state(self) -> bytes:
        state = self.state
        with self.lock:
            shipped = snapshot(state, state.epoch)
            store = state.checkpoints  # its timeline: the epochs kept, the sync epoch's state
            extra, epochs = shipped["extra"], store.epochs()
            if state.epoch in epochs:
                try:
                    # On the CPU, as the snapshot: a file written on a device this process
                    # lacks loads, and one on this GPU adds no copy of a checkpoint there.
                    shipped["latest_checkpoint"] = store.load(state.epoch, map_location="cpu")
                except Exception:  # unreadable here: the repaired rank drops its own too
                    logger.exception("epoch %d: its checkpoint goes with no repair", state.epoch)
                    epochs.remove(state.epoch)
            extra["abandoned_after"], extra["checkpoints"] = store.abandoned_after, epochs
        buf = io.BytesIO()
        torch.save(shipped, buf)
        return buf.getvalue()

    def import_state(self, payload: bytes) -> None:
        checkpoint = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict):
            raise ValueError("a replica payload must hold a snapshot mapping")
        state = self.state
        extra, latest = checkpoint.get("extra") or {}, checkpoint.pop("latest_checkpoint", None)
        key, after = max(int(extra.get("epoch", 0)), 0), extra.get("abandoned_after")
        # Checked before the repair, as every field: the timeline taken after it refuses one < 0.
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int) or after < 0
        ):
            raise ValueError(f"a replica payload's abandoned_after is {after!r}, no epoch")
        kept = extra.get("checkpoints")
        if kept is not None and not (
            isinstance(kept, list) and all(type(e) is int and e >= 0 for e in kept)
        ):
            raise ValueError(f"a replica payload's checkpoints are {kept!r}, no epoch list")
        if latest is not None and not (
            isinstance(latest, dict) and latest.get("format") == CHECKPOINT_FORMAT
        ):
            raise ValueError("a replica payload's latest checkpoint is no checkpoint")
        store = MemoryCheckpointStore(run_id=state.config.run_id, max_rollback_epochs=0)
        store.save(key, checkpoint)  # restored from a store holding just the source's snapshot
        with self.lock:  # a close() on another thread waits, or came first and is refused
            state.require_registry(training=True)
            with state.checkpoints_replaced(store) as live:
                # Which layers the user's loop unfroze is this rank's, as on every rank: a layer
                # unfrozen and not yet in a group (the source's too, then) stays so (the restore
                # freezes one no restored group holds, as a ROLLBACK to before it should).
                frozen = state.require_registry().hold.frozen
                unfrozen = [p.requires_grad for p in frozen]
                # The source tracks as this rank does: its tracked states load as this rank's
                # own would, now and from its checkpoint kept below (``kasmina.manager.tracked``).
                # The source's own mark, and the marks its checkpoint kept below carries (one
                # it took from a third rank's repair carries that rank's).
                peers = state.peer_writers
                kept_marks = writers_of(latest) if latest else frozenset()
                state.peer_writers = peers | writers_of(checkpoint) | kept_marks
                try:
                    # A repair in a sync under inference_mode: trainable; its kernels' fetches
                    # bounded as a prepare's (the other ranks wait in a collective meanwhile).
                    with training_tensors(), fetches_bounded(self.fetch_timeout_s):
                        restore_epoch(state, self.guard, key)
                except BaseException:
                    state.peer_writers = peers
                    raise
                finally:
                    for p, flag in zip(frozen, unfrozen, strict=True):
                        p.requires_grad_(flag)
            # The source's timeline: a rollback it made (or not) is ours now, and its checkpoints
            # stand for ours where ours may differ.
            ckpt = None if latest is None else (key, latest)
            live.follow_timeline(after, kept, ckpt, self.diverged_since)


class ManagerApplier:
    """The coordinator's ``CommandApplier`` for a kernel manager.

    ``prepare`` fetches a GERMINATE's kernel into the cache, so a rank that cannot get it says
    so before the ranks agree, not failing alone afterwards. The fetch is bounded by the
    command's timeout and, with ``prepare_timeout_s``, by that many seconds for all of one
    sync's prepares (the other ranks wait in a collective, which fails the run at the process
    group's timeout: ``DistributedKasmina`` gives half of it). ``begin_sync`` starts each sync's
    budget afresh, even after one that raised before ``apply``. Fetches run on the manager's
    fetch workers (``CommandQueue.fetch``), one per artifact (later prepares wait on it), none
    started once the budget is spent; one that outlasts its bound goes on (the kernel is cached
    for later) and this rank answers that it could not prepare the command. ``apply`` queues
    the agreed commands and runs the manager's safe point (``apply_pending(wait=True)``): the
    single-process path (nonces made durable first, GERMINATE's dry run, the command log).
    """

    def __init__(
        self,
        intake: CommandIntake,
        report: ManagerReport,
        *,
        prepare_timeout_s: float | None = None,
    ) -> None:
        if prepare_timeout_s is not None and not prepare_timeout_s > 0:
            raise ValueError(f"prepare_timeout_s must be > 0, got {prepare_timeout_s}")
        self.intake = intake  # its queue fetches and holds the commands, its handler acks
        self.report = report
        self.prepare_timeout_s = prepare_timeout_s
        # This sync's prepares: when the first fetch began and when they must be done
        # (monotonic); ``begin_sync`` (and ``apply``) clears them.
        self._prepare_started: float | None = None
        self._prepare_deadline: float | None = None
        self._lock = fork_safe(threading.Lock())
        self._fetches: dict[str, Future[Any]] = {}  # artifact id -> its running fetch
        # This sync's prepares that fetched a kernel, handed to the first agreed command for
        # it: that command's GERMINATE then takes the fetched kernel, as a fetch of its own
        # would give it, and is counted once, a miss (looked up again, it counted a hit too).
        self._fetched: dict[str, Future[Any]] = {}
        # The kernels this sync's prepares found or put in the cache, pinned until ``apply``
        # is done: a later prepare's fetch would evict one (least recently used, unpinned), and
        # its GERMINATE then fetch it again at apply, outside the sync's time bound.
        self._pinned: list[str] = []

    def begin_sync(self) -> None:
        """A sync begins: its prepares get a whole ``prepare_timeout_s`` between them (and the
        fetches and pins of an earlier sync that never applied are no command's)."""
        self._prepare_started = self._prepare_deadline = None
        self._fetched = {}
        self._unpin(self._take_pins())

    def _take_pins(self) -> list[str]:
        pinned, self._pinned = self._pinned, []
        return pinned

    def _unpin(self, pinned: Sequence[str]) -> None:
        cache = self.intake.queue.loader.cache
        for artifact_id in pinned:
            cache.unpin(artifact_id)

    def prepare(self, command: KasminaCommand) -> str:
        seed = command.seed
        if seed is None or seed.operation != _GERMINATE or not seed.artifact_id:
            return ""
        if not self.intake.queue.knows(seed.seed_id):  # refused as that on every rank
            return ""
        artifact_id, loader = seed.artifact_id, self.intake.queue.loader
        if artifact_id in loader.cache and loader.pin(artifact_id):  # no hit or miss counted
            self._pinned.append(artifact_id)
            return ""
        now = time.monotonic()
        timeout = command.timeout_s
        deadline = now + timeout if timeout > 0 and math.isfinite(timeout) else None
        if self.prepare_timeout_s is not None and self._prepare_deadline is None:
            self._prepare_started, self._prepare_deadline = now, now + self.prepare_timeout_s
        limits = [d for d in (deadline, self._prepare_deadline) if d is not None]
        limit = min(limits) if limits else None
        start = limit is None or limit > now
        fetch = self._fetch(artifact_id, deadline, start=start)
        if fetch is None:
            if start:  # the manager's fetch workers are shut down
                return f"not fetching {artifact_id}: the manager is closed"
            return (
                f"not fetching {artifact_id}: this sync's prepare time was spent "
                f"({now - (self._prepare_started or now):.2f} s of the "
                f"{self.prepare_timeout_s:g} s {_PREPARE_SHARE_TEXT})"
            )
        # The store fetch has its command's deadline; this rank waits for it until ``limit``.
        wait([fetch], timeout=None if limit is None else max(0.0, limit - now))
        if not fetch.done():
            waited = time.monotonic() - now
            if deadline is None or limit < deadline:
                return (
                    f"fetching {artifact_id} did not finish: this rank waited {waited:.2f} s for "
                    f"it, and this sync's prepare time was spent ({self.prepare_timeout_s:g} s "
                    f"{_PREPARE_SHARE_TEXT})"
                )
            return (
                f"fetching {artifact_id} did not finish within the command's {timeout:g} s "
                f"(this rank waited {waited:.2f} s for it)"
            )
        if fetch.cancelled():  # only the manager's ``close`` cancels a fetch
            return f"fetching {artifact_id} was cancelled: the manager is closed"
        exc = fetch.exception()
        if exc is not None:
            return f"fetching {artifact_id} failed: {type(exc).__name__}: {exc}"
        self._fetched[artifact_id] = fetch
        if loader.pin(artifact_id, fetch.result()):  # not if served uncached: nothing evicts it
            self._pinned.append(artifact_id)
        return ""

    def _fetch(
        self, artifact_id: str, deadline: float | None, *, start: bool
    ) -> Future[Any] | None:
        """The running fetch of ``artifact_id``, or a new one on the manager's fetch workers
        (``CommandQueue.fetch``) if ``start`` (None if not, or once the manager is closed). A
        fetch leaves ``_fetches`` when it ends, cached or failed."""
        with self._lock:
            fetch = self._fetches.get(artifact_id)
            if fetch is not None or not start:
                return fetch
            fetch = self.intake.queue.fetch(artifact_id, deadline)
            if fetch is None:
                return None
            self._fetches[artifact_id] = fetch

        def forget(done: Future[Any]) -> None:
            with self._lock:
                if self._fetches.get(artifact_id) is done:
                    del self._fetches[artifact_id]

        fetch.add_done_callback(forget)  # at once, here, if it has finished already
        return fetch

    def apply(self, commands: Sequence[KasminaCommand]) -> list[tuple[bool, str]]:
        fetched, pinned = self._fetched, self._take_pins()
        try:
            return self._apply(commands, fetched)
        finally:
            self._unpin(pinned)  # the seeds that took a kernel hold pins of their own

    def _apply(
        self, commands: Sequence[KasminaCommand], fetched: dict[str, Future[Any]]
    ) -> list[tuple[bool, str]]:
        self.begin_sync()  # every prepare of this sync is done
        queued: set[int] = set()
        for command in commands:
            seed = command.seed
            fetch = None  # a GERMINATE takes its prepare's; one of an unknown seed none (another's)
            if (
                seed is not None
                and seed.operation == _GERMINATE
                and self.intake.queue.knows(seed.seed_id)
            ):
                fetch = fetched.pop(seed.artifact_id, None)
            if self.intake.queue.submit(command, fetch):
                queued.add(id(command))
            else:
                self.refuse(command, "the manager's command queue is full or closed")
        outcomes: dict[str, deque[Any]] = {}
        with fetches_bounded(self.prepare_timeout_s):  # a ROLLBACK's kernels, as a prepare's
            for outcome in self.intake.apply_pending(wait=True):  # every rank, graph or not
                outcomes.setdefault(outcome.command_id, deque()).append(outcome)
        results = []
        for command in commands:
            applied = outcomes.get(command.command_id)
            if id(command) in queued and applied:
                outcome = applied.popleft()
                results.append((outcome.ok, outcome.reason))
            else:
                results.append((False, "not applied at this safe point"))
        return results

    def refuse(self, command: KasminaCommand, reason: str) -> None:
        with self.intake.lock:  # logged first: a sink reading command_log at the complete finds it
            self.report.note_command(command, False, reason)
        self.intake.handler.complete(command, False)

    def revise(self, command: KasminaCommand, ok: bool, reason: str) -> None:
        """The verdict the ranks agreed on for ``command``, where the repair overturned this
        rank's own outcome: the command log records it as the command ended here."""
        self.report.revise_command(command, ok, reason)
