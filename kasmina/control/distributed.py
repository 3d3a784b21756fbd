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
   GERMINATE). The ranks all-gather whether they are ready; a command is applied, in the same
   order on every rank, only if every rank is, and is otherwise refused everywhere with a reason
   that names the ranks that could not.
3. **Repair, not only detect.** After applying, every rank checksums its replicated state and the
   checksums are all-gathered. A rank that disagrees with the majority (with two ranks, or a
   tie, the group holding rank 0 wins) receives the state of the lowest rank of the majority and
   loads it; the checksums are compared again, and only a rank that still disagrees is handed to
   ``on_divergence`` (typically: quarantine its seeds). Every repair is logged and counted
   (``stats["repairs"]``, the ``distributed.repair`` event).

What is replicated, and how it is applied, checksummed, exported and loaded, is given by two
small protocols (``CommandApplier``, ``ReplicaState``) so this module imports nothing above
``control``; the kernel manager's implementations are in ``kasmina.manager.ddp``.

Without an initialised process group the coordinator runs as a single rank with no collectives,
so the same training loop works in one process and under ``torchrun``.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist

from kasmina.control.commands import CommandExecutor, KasminaCommand
from kasmina.control.processes import collective_device, global_rank
from kasmina.leyline import AdaptationCommand, MetricType

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = [
    "CommandApplier",
    "CommandResult",
    "DistributedCoordinator",
    "EpochSyncResult",
    "ExecutorApplier",
    "RelayHandler",
    "ReplicaState",
    "TensorReplica",
    "nested_checksum",
    "state_checksum",
]

# One relayed command on the wire: receive time (float64 seconds), length, then the raw bytes.
_ENTRY = struct.Struct("<dQ")
_LEN = struct.Struct("<Q")

# What one rank says about one relayed command (all-gathered; a command runs only if all READY).
READY, UNVERIFIED, UNPREPARED, DUPLICATE = 0, 1, 2, 3
_REFUSAL = {
    UNVERIFIED: "could not verify it",
    UNPREPARED: "could not prepare it",
    DUPLICATE: "it duplicates an earlier command of the same sync",
}


class RelayHandler(Protocol):
    """The one door, split in its halves (``LeylineAdaptationHandler`` satisfies it)."""

    def accept(self, raw: bytes) -> KasminaCommand | None: ...

    def accept_relayed(self, raw: bytes, received_at: float) -> KasminaCommand | None: ...

    def complete(self, command: KasminaCommand, success: bool) -> None: ...


class CommandApplier(Protocol):
    """How one rank readies and applies commands the ranks agreed on.

    ``prepare`` runs before the agreement: "" when this rank can apply the command, else why not
    (it may block, bounded by the command's timeout: a GERMINATE's kernel fetch). ``apply``
    carries out the agreed commands in order and returns ``(ok, reason)`` for each; ``refuse``
    records a command this rank accepted that is applied nowhere. Both report the outcome to the
    handler (``complete``).
    """

    def prepare(self, command: KasminaCommand) -> str: ...

    def apply(self, commands: Sequence[KasminaCommand]) -> list[tuple[bool, str]]: ...

    def refuse(self, command: KasminaCommand, reason: str) -> None: ...


class ReplicaState(Protocol):
    """The state every rank must hold bit for bit: its checksum, and a copy to repair from."""

    def checksum(self) -> int: ...

    def export_state(self) -> bytes: ...

    def import_state(self, payload: bytes) -> None: ...


StateProvider = Callable[[], Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class CommandResult:
    """What became of one relayed command, the same list on every rank."""

    command_id: str
    origin: int  # the rank that received (and first verified) it
    ok: bool  # applied on this rank
    reason: str  # why not ("" when ok)


@dataclass(frozen=True)
class EpochSyncResult:
    """What one ``sync_epoch`` did, as seen from ``rank`` (every rank gets the same verdict)."""

    epoch: int
    rank: int
    world_size: int
    commands: tuple[CommandResult, ...]  # every relayed command, in the order applied
    checksums: tuple[int, ...]  # per rank, after the commands and before any repair
    divergent_ranks: tuple[int, ...]  # ranks that disagreed with the majority
    source_rank: int = -1  # the rank the divergent ones were repaired from (-1: none)
    repaired_ranks: tuple[int, ...] = ()  # divergent ranks that agree again after the repair

    @property
    def outcomes(self) -> tuple[bool, ...]:
        """Whether each relayed command was applied on this rank, in order."""
        return tuple(c.ok for c in self.commands)

    @property
    def diverged(self) -> bool:
        """Whether this rank was one of the divergent ones."""
        return self.rank in self.divergent_ranks

    @property
    def consistent(self) -> bool:
        """No rank disagreed (nothing needed repairing)."""
        return not self.divergent_ranks

    @property
    def unrepaired_ranks(self) -> tuple[int, ...]:
        """Divergent ranks that still disagree after the repair (handed to ``on_divergence``)."""
        return tuple(r for r in self.divergent_ranks if r not in self.repaired_ranks)


def state_checksum(state: Mapping[str, torch.Tensor]) -> int:
    """CRC-32 over names, dtypes, shapes and raw bytes of ``state`` in sorted name order.

    Bitwise: two ranks agree only if every element is bit-identical, which is what lockstep
    data parallelism promises.
    """
    crc = 0
    for name in sorted(state):
        crc = _crc_tensor(name, state[name], crc)
    return crc


def _crc_tensor(name: str, tensor: torch.Tensor, crc: int) -> int:
    t = tensor.detach()
    crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
    flat = t.to("cpu").contiguous().reshape(-1)
    if flat.numel():
        crc = zlib.crc32(flat.view(torch.uint8).numpy().tobytes(), crc)
    return crc


def nested_checksum(value: Any, crc: int = 0) -> int:
    """CRC-32 of a nest of mappings, sequences, tensors and plain values (a state dict, an
    optimizer's state): keys in sorted order, tensors by their bytes, the rest by ``repr``."""
    if isinstance(value, torch.Tensor):
        return _crc_tensor("", value, crc)
    if isinstance(value, Mapping):
        for key in sorted(value, key=repr):
            crc = nested_checksum(value[key], zlib.crc32(f"k{key!r}".encode(), crc))
        return zlib.crc32(b"}", crc)
    if isinstance(value, (list, tuple)):
        for item in value:
            crc = nested_checksum(item, zlib.crc32(b",", crc))
        return zlib.crc32(b"]", crc)
    return zlib.crc32(f"v{value!r}".encode(), crc)


class TensorReplica:
    """A ``ReplicaState`` over named tensors whose names, dtypes and shapes never change (a
    state table, a fixed set of weights): repaired by copying the source's bytes in place.

    The payload is a length-prefixed JSON header per tensor and its raw bytes, so a repair
    unpickles nothing. ``after_import`` runs after a load (e.g. ``GPUStateTensor.resync``).
    """

    def __init__(
        self, provider: StateProvider, *, after_import: Callable[[], object] | None = None
    ) -> None:
        self.provider = provider
        self.after_import = after_import

    def checksum(self) -> int:
        return state_checksum(self.provider())

    def export_state(self) -> bytes:
        chunks: list[bytes] = []
        state = self.provider()
        for name in sorted(state):
            t = state[name].detach().to("cpu").contiguous()
            header = json.dumps({"name": name, "dtype": str(t.dtype), "shape": list(t.shape)})
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            for part in (header.encode(), data):
                chunks += [_LEN.pack(len(part)), part]
        return b"".join(chunks)

    def import_state(self, payload: bytes) -> None:
        state = self.provider()
        parts = list(_length_prefixed(payload))
        if len(parts) % 2:
            raise ValueError("replica payload is truncated")
        incoming: dict[str, tuple[dict[str, Any], bytes]] = {}
        for header, data in zip(parts[::2], parts[1::2], strict=True):
            meta = json.loads(header)
            incoming[meta["name"]] = (meta, data)
        if set(incoming) != set(state):
            raise ValueError(f"replica payload names {sorted(incoming)}, expected {sorted(state)}")
        for name, (meta, data) in incoming.items():
            live = state[name]
            if meta["dtype"] != str(live.dtype) or meta["shape"] != list(live.shape):
                raise ValueError(f"replica payload {name} is {meta}, expected {live.dtype}")
            if len(data) != live.numel() * live.element_size():
                raise ValueError(f"replica payload {name} holds {len(data)} bytes")
        with torch.no_grad():
            for name, (_, data) in incoming.items():
                live = state[name]
                if not data:
                    continue
                src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                live.copy_(src.view(live.dtype).reshape(live.shape).to(live.device))
        if self.after_import is not None:
            self.after_import()


class ExecutorApplier:
    """A ``CommandApplier`` over a synchronous ``CommandExecutor`` (the handler's own): every
    command is ready at once and executed in turn. For stand-ins and simple executors; the
    kernel manager has its own (``kasmina.manager.ddp``)."""

    def __init__(self, handler: RelayHandler, executor: CommandExecutor) -> None:
        self.handler = handler
        self.executor = executor

    def prepare(self, command: KasminaCommand) -> str:
        return ""

    def apply(self, commands: Sequence[KasminaCommand]) -> list[tuple[bool, str]]:
        results = []
        for command in commands:
            try:
                ok = bool(self.executor.execute(command))
            except Exception as exc:
                logger.exception("executor raised on command %s", command.command_id)
                ok, reason = False, f"executor raised {type(exc).__name__}: {exc}"
            else:
                reason = "" if ok else "refused by the executor"
            self.handler.complete(command, ok)
            results.append((ok, reason))
        return results

    def refuse(self, command: KasminaCommand, reason: str) -> None:
        self.handler.complete(command, False)


@dataclass
class _Received:
    """A command this rank accepted, waiting for the next sync."""

    raw: bytes
    received_at: float
    command: KasminaCommand


@dataclass
class _Relayed:
    raw: bytes
    received_at: float
    origin: int


class DistributedCoordinator:
    """Commands verified on arrival and applied on every rank or none; replicas checksummed
    and repaired at every ``sync_epoch`` (see the module docstring).

    ``handler`` verifies (on arrival, and relayed from other ranks); ``state`` is the replicated
    state (a ``ReplicaState``, or a function returning named tensors, wrapped in a
    ``TensorReplica``); ``applier`` applies agreed commands (default: the handler's executor,
    at once); ``on_divergence`` is called on a rank that disagrees and could not be repaired;
    ``repair=False`` only detects. ``clock`` gives receive times (default: the handler's
    verifier's clock, which judged freshness).
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
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
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
        self.max_pending = max_pending
        verifier = getattr(handler, "verifier", None)
        self._clock = clock or getattr(verifier, "now", None) or time.time
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1
        self._device = collective_device(group) if self.distributed else torch.device("cpu")
        self._lock = threading.Lock()
        self._pending: list[_Received] = []
        self.stats: Counter[str] = Counter()
        self.history: list[EpochSyncResult] = []

    @property
    def pending(self) -> int:
        """Commands accepted on this rank since the last sync."""
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------ arrival
    def submit(self, raw: bytes) -> bool:
        """A command received on this rank (any thread, any time); never raises.

        Verified now, completely (the handler's ``accept``: freshness against this moment,
        the nonce used up), then held for the next ``sync_epoch``. True if it was accepted;
        whether it was applied is in that sync's result.
        """
        received_at = self._clock()  # before the check: fresh now is fresh at this time
        command = self.handler.accept(raw)
        if command is None:
            self.stats["refused_on_arrival"] += 1
            return False
        with self._lock:
            full = len(self._pending) >= self.max_pending
            if not full:
                self._pending.append(_Received(bytes(raw), received_at, command))
        if full:
            self.stats["dropped:queue_full"] += 1
            logger.warning(
                "command %s dropped: %d commands already wait for the next sync",
                command.command_id,
                self.max_pending,
            )
            self.applier.refuse(command, "the coordinator's queue is full")
            return False
        self.stats["submitted"] += 1
        return True

    # ------------------------------------------------------------------ the boundary
    def sync_epoch(self, epoch: int) -> EpochSyncResult:
        """Collective: every rank must call it at the same boundary with the same ``epoch``,
        on its training thread at a safe point (no forward or backward under way)."""
        with self._lock:
            local, self._pending = self._pending, []
        relayed = self._exchange(epoch, local)
        commands = self._apply(relayed, local)
        outcome_digest = zlib.crc32(bytes(c.ok for c in commands))
        rows = self._all_gather([epoch, self.state.checksum(), outcome_digest, len(commands)])
        checksums = tuple(row[1] for row in rows)
        divergent = _minority_ranks([tuple(row) for row in rows])
        source, repaired = -1, ()
        if divergent and self.repair:
            source = min(r for r in range(len(rows)) if r not in divergent)
            repaired = self._repair(epoch, source, divergent)
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
        self._report(result)
        return result

    def _exchange(self, epoch: int, local: list[_Received]) -> list[_Relayed]:
        """Every rank's received commands, in rank order then arrival order, on every rank.

        One small all-gather of (epoch, count, bytes) per rank; then nothing (no commands), a
        broadcast (one rank received some: the usual case), or an all-gather of padded frames.
        """
        body = b"".join(_ENTRY.pack(e.received_at, len(e.raw)) + e.raw for e in local)
        if not self.distributed:
            return [_Relayed(e.raw, e.received_at, 0) for e in local]
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
        relayed: list[_Relayed] = []
        for r in senders:
            relayed += _unframe(bodies[r], rows[r][1], r)
        return relayed

    def _apply(self, relayed: list[_Relayed], local: list[_Received]) -> tuple[CommandResult, ...]:
        """Judge each relayed command here, agree with the other ranks, apply what all can."""
        mine = iter(local)
        by_bytes = {e.raw: e.command for e in local}
        used: set[int] = set()  # local commands already standing for a relayed one
        first_seen: set[bytes] = set()
        judged: list[tuple[KasminaCommand | None, int]] = []
        for entry in relayed:
            own = next(mine).command if entry.origin == self.rank else None
            if entry.raw in first_seen:  # the first copy stands for it: this one runs nowhere
                leftover = own if own is not None and id(own) not in used else None
                judged.append((leftover, DUPLICATE))
                continue
            first_seen.add(entry.raw)
            # This rank's own copy, or the same bytes this rank received too: verified here
            # already (its nonce is used up, so a second check would call it a replay).
            command = own or by_bytes.get(entry.raw)
            if command is None:
                command = self.handler.accept_relayed(entry.raw, entry.received_at)
            if command is None:
                judged.append((None, UNVERIFIED))
                continue
            used.add(id(command))
            problem = self._prepare(command)
            judged.append((command, UNPREPARED if problem else READY))
        codes = self._gather_codes([code for _, code in judged])
        agreed = [
            (i, command)
            for i, ((command, _), column) in enumerate(zip(judged, codes, strict=True))
            if command is not None and all(c == READY for c in column)
        ]
        outcomes = self.applier.apply([command for _, command in agreed])
        results: dict[int, CommandResult] = {}
        for (i, command), (ok, reason) in zip(agreed, outcomes, strict=True):
            results[i] = CommandResult(command.command_id, relayed[i].origin, ok, reason)
            self.stats["applied" if ok else "failed"] += 1
        for i, ((command, _), column) in enumerate(zip(judged, codes, strict=True)):
            if i in results:
                continue
            reason = _refusal(column)
            if command is not None:
                self.applier.refuse(command, reason)
            command_id = command.command_id if command is not None else _command_id(relayed[i].raw)
            results[i] = CommandResult(command_id, relayed[i].origin, False, reason)
            self.stats["refused"] += 1
            if self.rank == 0:
                logger.warning("command %s refused on every rank: %s", command_id, reason)
        return tuple(results[i] for i in range(len(relayed)))

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
            logger.error(
                "epoch %d: ranks %s diverged from the majority (checksums %s); repaired from "
                "rank %d: %s",
                result.epoch,
                list(result.divergent_ranks),
                [f"{c:08x}" for c in result.checksums],
                result.source_rank,
                list(result.repaired_ranks),
            )
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
    return all(
        callable(getattr(state, name, None))
        for name in ("checksum", "export_state", "import_state")
    )


def _refusal(column: Sequence[int]) -> str:
    """The reason, the same on every rank, a command is applied nowhere."""
    if DUPLICATE in column:  # judged alike on every rank
        return "not applied on any rank: " + _REFUSAL[DUPLICATE]
    parts = []
    for code in (UNVERIFIED, UNPREPARED):
        ranks = [r for r, c in enumerate(column) if c == code]
        if ranks:
            parts.append(f"rank(s) {ranks} {_REFUSAL[code]}")
    return "not applied on any rank: " + "; ".join(parts)


def _minority_ranks(keys: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Ranks whose key differs from the most common one; ties go to rank 0's key."""
    counts = Counter(keys)
    best = max(counts.values())
    majority = keys[0] if counts[keys[0]] == best else counts.most_common(1)[0][0]
    return tuple(r for r, k in enumerate(keys) if k != majority)


def _length_prefixed(body: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(body):
        if pos + _LEN.size > len(body):
            raise ValueError("length-prefixed payload is truncated")
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if pos + n > len(body):
            raise ValueError("length-prefixed payload is truncated")
        yield body[pos : pos + n]
        pos += n


def _unframe(body: bytes, count: int, origin: int) -> list[_Relayed]:
    out: list[_Relayed] = []
    pos = 0
    for _ in range(count):
        received_at, n = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        out.append(_Relayed(body[pos : pos + n], received_at, origin))
        pos += n
    if pos != len(body):
        raise RuntimeError(f"command exchange framing mismatch ({pos} != {len(body)} bytes)")
    return out


def _bytes(buf: torch.Tensor) -> bytes:
    return buf.cpu().numpy().tobytes()


def _command_id(raw: bytes) -> str:
    """The id of a relayed command, for the record ("" if it does not even parse)."""
    try:
        return AdaptationCommand.FromString(raw).command_id
    except Exception:
        return ""
