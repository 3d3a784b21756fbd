"""Multi-process coordination: verify once, apply everywhere, and repair a rank that drifts.

Why: under data parallelism every rank holds its own copy of the host, its seeds and the lifecycle
state table. A controller command must change every copy the same way at the same point of
training, or the copies drift apart. Three rules keep them together (docs/design.md §5,
"Multi-process runs"):

1. **Verify once, on arrival.** The rank that receives a command (any rank: ``submit``, or the
   kernel manager's door once a ``DistributedKasmina`` relays it) runs every check of the one
   door at once (size, parse, signature, freshness, nonce, ranges) and records its verifier's
   clock as the receive time. Freshness is therefore judged when the command arrives, never when
   it is applied: an epoch longer than the freshness window cannot make a command stale.
2. **Apply everywhere, all or none.** At the next ``sync_epoch`` (a collective every rank calls
   at the same boundary) the ranks exchange what they received, as raw bytes framed in a uint8
   tensor with the receive time (no pickle crosses the wire). Every other rank re-checks the
   signature and records the nonce, judging freshness against the receive time
   (``LeylineAdaptationHandler.accept_relayed``), then prepares it (a kernel fetched, for a
   GERMINATE). A rank that received the same command itself (any encoding of the message, or
   a retry under its id that says the same: ``relay.command_keys``; before the sync or during
   it) uses its own verified copy, off its queue: the first copy stands, and runs once. The
   ranks all-gather whether they are ready; a command is applied, in the same order on every
   rank, only if every rank is, else refused everywhere, the reason naming the ranks that could not.
3. **Repair, not only detect.** After applying, every rank checksums its replicated state and the
   checksums are all-gathered. A rank that disagrees with the majority of the ranks whose state
   is finite (a tie goes to the group holding the lowest such rank, so a rank whose state is not
   finite loses even a two-rank tie) receives the state of the lowest rank of the majority and
   loads it; the checksums are compared again, and only a rank that still disagrees is handed to
   ``on_divergence`` (typically: quarantine its seeds). Every repair is logged and counted
   (``stats["repairs"]``, the ``distributed.repair`` event). A command whose execution
   succeeded on some ranks and failed on others then gets one verdict on every rank, that of
   the lowest rank of the majority (whose state a repaired rank now holds); a repaired rank
   whose own outcome differed reports the verdict to its handler again (``revise_completion``)
   and to its applier's optional ``revise``.

An applier may also define ``begin_sync()``: every ``sync_epoch`` calls it first, before any
prepare, so what the applier keeps for one sync (the kernel manager's applier: the time budget
its prepares share) starts afresh even when the previous sync raised before ``apply``.

This module holds the coordinator that carries out the three rules, the majority rule and the
repair. What a sync returns (``EpochSyncResult``), how commands cross between ranks and how
each rank judges them (``RelayHandler``, ``CommandApplier``, the framing, the per-rank verdict)
is in ``kasmina.control.relay``; what is replicated, and how it is checksummed, exported and
loaded (``ReplicaState``, ``TensorReplica``), in ``kasmina.control.replica``. Both are given as
small protocols, so this package imports nothing above ``control``; the kernel manager's
implementations are in ``kasmina.manager.ddp``.

Without an initialised process group the coordinator runs as a single rank with no collectives,
so the same training loop works in one process and under ``torchrun``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kasmina.control.commands import KasminaCommand
from kasmina.control.processes import collective_device, global_rank
from kasmina.control.relay import (
    DUPLICATE,
    READY,
    UNPREPARED,
    UNVERIFIED,
    CommandApplier,
    CommandResult,
    EpochSyncResult,
    ExecutorApplier,
    HeldCommands,
    Received,
    Relayed,
    RelayHandler,
    command_keys,
    frame,
    refusal,
    relayed_command_id,
    revise_completion,
    split_refusal,
    unframe,
)
from kasmina.control.replica import ReplicaState, StateProvider, TensorReplica, minority_ranks
from kasmina.leyline import MetricType
from kasmina.utils.process_group import process_group_active
from kasmina.utils.ratelimit import rarely

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

HISTORY_SIZE = 256  # sync results kept in ``DistributedCoordinator.history``
ARRIVAL_WAIT_S = 10.0  # how long a sync waits for a copy of a relayed command still arriving

# The row every rank all-gathers after applying: epoch, checksum, count, a 0/1 per command.
_OUTCOMES = 3

__all__ = ["DistributedCoordinator"]


class DistributedCoordinator:
    """Commands verified on arrival and applied on every rank or none; replicas checksummed
    and repaired at every ``sync_epoch`` (see the module docstring).

    ``handler`` verifies (on arrival, and relayed from other ranks); ``state`` is the replicated
    state (a ``ReplicaState``, or a function returning named tensors, wrapped in a
    ``TensorReplica``); ``applier`` applies agreed commands (default: the handler's executor,
    at once); ``on_divergence`` is called on a rank that disagrees and could not be repaired;
    ``repair=False`` only detects. ``clock`` gives receive times (default: the handler's
    verifier's clock, which judged freshness). An applier with a ``begin_sync()`` method has it
    called at the start of every ``sync_epoch``, before any ``prepare``.
    """

    def __init__(
        self,
        handler: RelayHandler,
        state: ReplicaState | StateProvider,
        *,
        applier: CommandApplier | None = None,
        on_divergence: Callable[[EpochSyncResult], None] | None = None,
        repair: bool = True,
        telemetry: TelemetryReporter | None = None,
        group: Any = None,
        max_pending: int = 1024,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._held = HeldCommands(max_pending)
        self.handler = handler
        self.state: ReplicaState = state if _is_replica(state) else TensorReplica(state)
        if applier is None:
            executor = getattr(handler, "executor", None)
            if executor is None:
                raise TypeError("give an applier, or a handler with an executor")
            applier = ExecutorApplier(handler, executor)
        self.applier = applier
        self.on_divergence = on_divergence
        self.repair = repair
        self.telemetry = telemetry
        self.group = group
        verifier = getattr(handler, "verifier", None)
        self._clock = clock or getattr(verifier, "now", None) or time.time
        self.distributed = process_group_active()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self._device = collective_device(group) if self.distributed else torch.device("cpu")
        self._applying = False  # a sync's commands began to apply (none go back to be held)
        self._taken: list[KasminaCommand] = []  # this sync's commands, verified on this rank
        self.stats: Counter[str] = Counter()
        self.history: deque[EpochSyncResult] = deque(maxlen=HISTORY_SIZE)  # the latest (bounded)

    @property
    def max_pending(self) -> int:
        """How many accepted commands this rank holds for its next sync, at most."""
        return self._held.max_pending

    @max_pending.setter
    def max_pending(self, value: int) -> None:
        self._held.max_pending = value  # ``ValueError`` there below 1

    @property
    def pending(self) -> int:
        """Commands accepted on this rank since the last sync."""
        return len(self._held)

    # ------------------------------------------------------------------ arrival
    def submit(self, raw: bytes) -> bool:
        """A command received on this rank (any thread, any time); never raises.

        Verified now, completely (the handler's ``accept``: freshness against this moment,
        the nonce used up), then held for the next ``sync_epoch``. True if it was accepted;
        whether it was applied is in that sync's result."""
        received_at = self._clock()  # before the check: fresh now is fresh at this time
        limit = getattr(self.handler, "max_message_bytes", None)  # larger: refused unparsed
        identity, command_id, content = command_keys(raw, limit)
        with self._held.arriving(identity, command_id):  # a sync relaying it waits for it
            command = self.handler.accept(raw)
            if command is None:
                self.stats["refused_on_arrival"] += 1
                return False
            entry = Received(bytes(raw), received_at, command, identity, command_id, content)
            full = not self._held.add(entry)
        if full and self._held.closed:  # closed since its check began: reported, not held
            self._refuse(command, "the multi-rank coordinator closed before its next sync")
            return False
        if full:
            self.stats["dropped:queue_full"] += 1
            logger.log(
                rarely(self.stats["dropped:queue_full"], 1000),
                "command %s dropped: %d commands already wait for the next sync [%d dropped]",
                command.command_id, self.max_pending, self.stats["dropped:queue_full"],
            )  # fmt: skip
            self.applier.refuse(command, "the coordinator's queue is full")
            return False
        self.stats["submitted"] += 1
        return True

    def drop_pending(self, reason: str) -> None:
        """Refuse every command held for the next sync, and any accepted later, each reported
        through the applier (its manager closed: no sync will apply them)."""
        for entry in self._held.close():
            self._refuse(entry.command, reason)

    # ------------------------------------------------------------------ the boundary
    def sync_epoch(self, epoch: int) -> EpochSyncResult:
        """Collective: every rank must call it at the same boundary with the same ``epoch``,
        on its training thread at a safe point (no forward or backward under way)."""
        self._begin_sync()
        local, exchanged = self._held.take_all(), False
        self._applying, self._taken = False, []
        try:
            relayed = self._exchange(epoch, local)
            exchanged = self.distributed  # other ranks may have used these nonces from here
            commands, judged = self._apply(relayed, local)
        except BaseException:  # a Ctrl-C or a failed collective before anything was applied
            if not self._applying:
                self._unapplied(local, exchanged)
            raise
        outcomes = [int(c.ok) for c in commands]
        row = [epoch, self.state.checksum(), len(commands), *outcomes, self._healthy()]
        rows = self._all_gather(row)  # the health last: ``_OUTCOMES`` indexes the outcomes
        checksums = tuple(row[1] for row in rows)
        divergent = minority_ranks([tuple(r[:-1]) for r in rows], [bool(r[-1]) for r in rows])
        source, repaired = -1, ()
        if divergent and self.repair:
            source = min(r for r in range(len(rows)) if r not in divergent)
            repaired = self._repair(epoch, source, divergent)
        if divergent:
            commands = self._settle(commands, judged, rows, divergent, source, repaired)
        result = EpochSyncResult(
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            commands=commands,
            checksums=checksums,
            divergent_ranks=divergent,
            source_rank=source,
            repaired_ranks=repaired,
        )
        self.history.append(result)
        self.stats["syncs"] += 1
        self._report(result)
        return result

    def _healthy(self) -> int:
        """1 unless the replica answers ``healthy()`` False (``ReplicaState``); a check that
        raises counts as healthy, as a replica without one (logged: the sync must go on)."""
        check = getattr(self.state, "healthy", None)
        try:
            return int(bool(check())) if callable(check) else 1
        except Exception:
            logger.exception("the replica's health check raised; counted as healthy")
            return 1

    def _begin_sync(self) -> None:
        """Tell the applier a sync begins (its optional ``begin_sync``), before any prepare: what
        it keeps per sync (a time budget for its prepares) must not outlive a sync that raised
        before ``apply``."""
        begin = getattr(self.applier, "begin_sync", None)
        if callable(begin):
            try:
                begin()
            except Exception:  # a bug in the applier must not stop the other ranks' sync
                logger.exception("the applier's begin_sync raised")

    def _exchange(self, epoch: int, local: list[Received]) -> list[Relayed]:
        """Every rank's received commands, in rank order then arrival order, on every rank.

        One small all-gather of (epoch, count, bytes) per rank; then nothing (no commands), a
        broadcast (one rank received some: the usual case), or an all-gather of padded frames."""
        body = frame(local)
        if not self.distributed:
            return [Relayed(e.raw, e.received_at, 0) for e in local]
        rows = self._all_gather([epoch, len(local), len(body)])
        if len({row[0] for row in rows}) > 1:
            self.stats["epoch_mismatch"] += 1
            logger.error("ranks sync different epochs: %s", [row[0] for row in rows])
        senders = [r for r, row in enumerate(rows) if row[1]]
        bodies: dict[int, bytes] = {}
        if len(senders) == 1:
            src = senders[0]
            if self.rank == src:
                buf = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(self._device)
            else:
                buf = torch.empty(rows[src][2], dtype=torch.uint8, device=self._device)
            dist.broadcast(buf, src=global_rank(self.group, src), group=self.group)
            bodies[src] = body if self.rank == src else _bytes(buf)
        elif senders:
            width = max(row[2] for row in rows)
            mine = torch.zeros(width, dtype=torch.uint8, device=self._device)
            if body:
                mine[: len(body)] = torch.frombuffer(bytearray(body), dtype=torch.uint8)
            bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
            dist.all_gather(bufs, mine, group=self.group)
            bodies = {r: _bytes(bufs[r])[: rows[r][2]] for r in senders}
        relayed: list[Relayed] = []
        for r in senders:
            relayed += unframe(bodies[r], rows[r][1], r)
        return relayed

    def _apply(
        self, relayed: list[Relayed], local: list[Received]
    ) -> tuple[tuple[CommandResult, ...], list[KasminaCommand | None]]:
        """Judge each relayed command here, agree with the other ranks, apply what all can.

        Returns the result of each relayed command and, beside it, this rank's verified copy of
        the command applied for it (None where none was applied)."""
        mine = iter(local)
        by_identity = {e.identity: e.command for e in local}
        by_id = {e.command_id: (e.content, e.command) for e in local if e.command_id}
        used: set[int] = set()  # local commands already standing for a relayed one
        first_seen: set[bytes | str] = set()
        judged: list[tuple[KasminaCommand | None, int]] = []
        for entry in relayed:
            own = next(mine).command if entry.origin == self.rank else None
            # One message, however encoded; and its retry (signed anew under its id) is it too.
            identity, command_id, content = command_keys(entry.raw)
            if identity in first_seen or command_id in first_seen:  # the first copy stands
                leftover = own if own is not None and id(own) not in used else None
                judged.append((leftover, DUPLICATE))  # for it: this one runs nowhere
                continue
            first_seen.update((identity, command_id) if command_id else (identity,))
            # This rank's own copy, or the same command received here too (before this sync or
            # during it, perhaps as a retry): verified already (a second check says replay).
            held = by_id.get(command_id)  # a retry of it, if it says the same
            retry = held[1] if held and held[0] == content else None
            command = own or by_identity.get(identity) or retry
            command = command or self._take_pending(identity, command_id, content)
            if command is None:
                command = self.handler.accept_relayed(entry.raw, entry.received_at)
            if command is None:
                judged.append((None, UNVERIFIED))
                continue
            used.add(id(command))
            self._taken.append(command)
            problem = self._prepare(command)
            judged.append((command, UNPREPARED if problem else READY))
        codes = self._gather_codes([code for _, code in judged])
        agreed = [
            (i, command)
            for i, ((command, _), column) in enumerate(zip(judged, codes, strict=True))
            if command is not None and all(c == READY for c in column)
        ]
        self._applying = True  # from here each command taken gets an outcome (the applier's)
        outcomes = self.applier.apply([command for _, command in agreed])
        results: dict[int, CommandResult] = {}
        applied: list[KasminaCommand | None] = [None] * len(relayed)
        for (i, command), (ok, reason) in zip(agreed, outcomes, strict=True):
            results[i] = CommandResult(command.command_id, relayed[i].origin, ok, reason)
            applied[i] = command
            self.stats["applied" if ok else "failed"] += 1
        for i, ((command, _), column) in enumerate(zip(judged, codes, strict=True)):
            if i in results:
                continue
            reason = refusal(column)
            if command is not None:
                self.applier.refuse(command, reason)
            command_id = (
                command.command_id if command is not None else relayed_command_id(relayed[i].raw)
            )
            results[i] = CommandResult(command_id, relayed[i].origin, False, reason)
            self.stats["refused"] += 1
            if self.rank == 0:
                logger.warning("command %s refused on every rank: %s", command_id, reason)
        return tuple(results[i] for i in range(len(relayed))), applied

    def _unapplied(self, local: list[Received], exchanged: bool) -> None:
        """A sync stopped before it applied anything: its commands wait for the next, in order
        (refused if it closed); once exchanged with other ranks (which may have used their
        nonces: relayed again, a replay there), each is reported refused, never lost."""
        if not exchanged:
            for entry in self._held.put_back(local):  # closed meanwhile: none held again
                self._refuse(entry.command, "the multi-rank coordinator closed")
            return
        commands = {id(c): c for c in [*self._taken, *(e.command for e in local)]}
        for command in commands.values():
            self._refuse(command, "the sync was interrupted before it applied it")

    def _refuse(self, command: KasminaCommand, reason: str) -> None:
        self.applier.refuse(command, reason)
        self.stats["refused"] += 1

    def _take_pending(self, identity: bytes, id_: str, content: bytes) -> KasminaCommand | None:
        """This rank's copy of the command (or its retry, saying the same) if it arrived after
        this sync took the held ones (another rank's is relayed now), so it is not relayed
        again; a copy still in its check here is waited for, a while (``HeldCommands.take``)."""
        entry = self._held.take(identity, id_, content, ARRIVAL_WAIT_S)
        if entry is None:
            return None
        self.stats["matched_during_sync"] += 1
        logger.debug("command %s also arrived here during the sync", entry.command.command_id)
        return entry.command

    def _prepare(self, command: KasminaCommand) -> str:
        try:
            problem = self.applier.prepare(command)
        except Exception as exc:  # a bug in prepare must not stop the other ranks' sync
            logger.exception("preparing command %s raised", command.command_id)
            problem = f"{type(exc).__name__}: {exc}"
        if problem:
            logger.warning(
                "rank %d cannot apply command %s: %s", self.rank, command.command_id, problem
            )
        return problem

    def _gather_codes(self, codes: list[int]) -> list[tuple[int, ...]]:
        """Per relayed command, every rank's code (rank order)."""
        if not codes:
            return []
        rows = self._all_gather(codes)
        return [tuple(row[i] for row in rows) for i in range(len(codes))]

    # ------------------------------------------------------------------ repair
    def _settle(
        self,
        commands: tuple[CommandResult, ...],
        judged: list[KasminaCommand | None],
        rows: list[list[int]],
        divergent: tuple[int, ...],
        source: int,
        repaired: tuple[int, ...],
    ) -> tuple[CommandResult, ...]:
        """One verdict per command on every rank after the repair: where the ranks' outcomes
        differ, that of the lowest rank of the majority (the state a repaired rank now holds).

        Every rank computes it from the gathered rows, so the results (reasons included) are the
        same everywhere. A repaired rank whose own outcome differed tells its handler and its
        applier the verdict; a rank that could not be repaired leaves its handler's count as it
        was (its state still reflects it) and is handed to ``on_divergence``."""
        truth = min(r for r in range(len(rows)) if r not in divergent)
        settled = []
        for i, result in enumerate(commands):
            column = [bool(row[_OUTCOMES + i]) for row in rows]
            ok = column[truth]
            if all(c == ok for c in column):
                settled.append(result)
                continue
            reason = "" if ok else split_refusal(column, source, repaired)
            if self.rank == 0:
                logger.warning(
                    "command %s applied on rank(s) %s, failed on rank(s) %s: %s everywhere",
                    result.command_id,
                    [r for r, c in enumerate(column) if c],
                    [r for r, c in enumerate(column) if not c],
                    "applied" if ok else "failed",
                )
            command = judged[i]
            if result.ok != ok and self.rank in repaired and command is not None:
                self._revise(command, ok, reason)
            settled.append(replace(result, ok=ok, reason=reason))
        return tuple(settled)

    def _revise(self, command: KasminaCommand, ok: bool, reason: str) -> None:
        """This rank reported the opposite of the verdict its repaired state now matches."""
        self.stats["applied" if ok else "failed"] += 1
        self.stats["failed" if ok else "applied"] -= 1
        self.stats["revised"] += 1
        revise_completion(self.handler, command, ok)
        revise = getattr(self.applier, "revise", None)
        if callable(revise):
            try:
                revise(command, ok, reason)
            except Exception:  # a bug in a record keeper must not stop the other ranks' sync
                logger.exception("revising command %s raised", command.command_id)

    def _repair(self, epoch: int, source: int, divergent: tuple[int, ...]) -> tuple[int, ...]:
        """Send ``source``'s replica to each divergent rank, load it there, compare again.
        Returns the divergent ranks that agree with ``source`` afterwards."""
        if self.rank == source:
            try:
                payload = self.state.export_state()
            except Exception:
                logger.exception("epoch %d: exporting the replica for a repair failed", epoch)
                payload = b""  # the divergent ranks are told there is nothing to load
            for target in divergent:
                self._send(payload, target)
            self.stats["repairs_served"] += len(divergent)
        elif self.rank in divergent:
            payload = self._recv(source)
            try:
                if not payload:
                    raise RuntimeError(f"rank {source} could not export its state")
                self.state.import_state(payload)
            except Exception:
                logger.exception(
                    "epoch %d: loading rank %d's state on rank %d failed", epoch, source, self.rank
                )
        after = self._all_gather([self.state.checksum()])
        truth = after[source][0]
        return tuple(r for r in divergent if after[r][0] == truth)

    def _send(self, payload: bytes, target: int) -> None:
        if not self.distributed:
            return
        dst = global_rank(self.group, target)
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self._device)
        dist.send(size, dst=dst, group=self.group)
        if payload:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self._device)
            dist.send(buf, dst=dst, group=self.group)

    def _recv(self, source: int) -> bytes:
        if not self.distributed:
            return b""
        src = global_rank(self.group, source)
        size = torch.zeros(1, dtype=torch.int64, device=self._device)
        dist.recv(size, src=src, group=self.group)
        n = int(size.item())
        if not n:
            return b""
        buf = torch.empty(n, dtype=torch.uint8, device=self._device)
        dist.recv(buf, src=src, group=self.group)
        return _bytes(buf)

    # ------------------------------------------------------------------ collectives, report
    def _all_gather(self, row: list[int]) -> list[list[int]]:
        if not self.distributed:
            return [row]
        mine = torch.tensor(row, dtype=torch.int64, device=self._device)
        bufs = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(bufs, mine, group=self.group)
        return [[int(v) for v in b.tolist()] for b in bufs]

    def _report(self, result: EpochSyncResult) -> None:
        labels = {"epoch": str(result.epoch), "rank": str(self.rank)}
        if self.telemetry is not None:
            self.telemetry.emit(
                "distributed.epoch_sync",
                float(len(result.commands)),
                MetricType.METRIC_TYPE_GAUGE,
                labels,
            )
        if result.consistent:
            return
        self.stats["divergences"] += 1
        if self.rank == 0:
            repair = "not repaired (repair off, or no finite majority)"
            if result.source_rank >= 0:
                repair = f"repaired from rank {result.source_rank}: {list(result.repaired_ranks)}"
            logger.error(
                "epoch %d: ranks %s diverged from the majority (checksums %s); %s",
                result.epoch, list(result.divergent_ranks),
                [f"{c:08x}" for c in result.checksums], repair,
            )  # fmt: skip
        if not result.diverged:
            return
        repaired = self.rank in result.repaired_ranks
        if self.telemetry is not None:
            self.telemetry.emit("distributed.divergence", 1.0, MetricType.METRIC_TYPE_EVENT, labels)
            if result.source_rank >= 0:
                self.telemetry.emit(
                    "distributed.repair",
                    1.0 if repaired else 0.0,
                    MetricType.METRIC_TYPE_EVENT,
                    {**labels, "source": str(result.source_rank)},
                )
        if repaired:
            self.stats["repairs"] += 1
            logger.warning(
                "epoch %d: this rank (%d) diverged (checksum %08x); resynchronised from rank %d",
                result.epoch,
                self.rank,
                result.checksums[self.rank],
                result.source_rank,
            )
            return
        if result.source_rank >= 0:
            self.stats["repair_failures"] += 1
        logger.error(
            "epoch %d: this rank (%d) diverged from the majority and was not repaired",
            result.epoch,
            self.rank,
        )
        if self.on_divergence is not None:
            self.on_divergence(result)


def _is_replica(state: object) -> bool:
    names = ("checksum", "export_state", "import_state")
    return all(callable(getattr(state, name, None)) for name in names)


def _bytes(buf: torch.Tensor) -> bytes:
    return buf.cpu().numpy().tobytes()
