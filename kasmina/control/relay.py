"""Relaying commands between ranks: what crosses the wire at an epoch sync, how a rank judges it.

Why: under data parallelism a command is verified once, on the rank that receives it, and must
then be applied on every rank or on none (docs/design.md §5, "Multi-process runs"). The
``DistributedCoordinator`` (``kasmina.control.distributed``) drives that relay at each
``sync_epoch``; this module holds what it is made of:

- ``RelayHandler`` -- the one door in its halves: ``accept`` on arrival, ``accept_relayed`` for
  a command another rank received (freshness judged against its receive time), ``complete``
  once the outcome is known (``LeylineAdaptationHandler`` satisfies it);
- ``CommandApplier`` -- how one rank prepares the relayed commands before the ranks agree and
  applies the agreed ones; ``ExecutorApplier`` is the plain one over a synchronous
  ``CommandExecutor`` (the kernel manager's is in ``kasmina.manager.coordination``);
- the commands a rank holds for its next sync (``HeldCommands``);
- the wire format -- the commands a rank received (``Received``), framed as raw bytes with their
  receive times (``frame``) and read back on every rank (``unframe``, giving ``Relayed``), so no
  pickle crosses the wire;
- the verdict -- what each rank says of each relayed command (``READY``, ``UNVERIFIED``,
  ``UNPREPARED``, ``DUPLICATE``; all-gathered, a command runs only if every rank is ready), the
  one reason given on every rank for a command applied nowhere (``refusal``), and what became of
  each command (``CommandResult``), reported again when the replica repair overturned a rank's
  own outcome (``revise_completion``), and what one sync did (``EpochSyncResult``).
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from kasmina.control.commands import CommandExecutor, KasminaCommand
from kasmina.leyline import AdaptationCommand
from kasmina.utils.checks import check_positive_int
from kasmina.utils.locks import fork_safe

logger = logging.getLogger(__name__)

__all__ = [
    "CommandApplier",
    "CommandResult",
    "EpochSyncResult",
    "HeldCommands",
    "ExecutorApplier",
    "RelayHandler",
]

# One relayed command on the wire: receive time (float64 seconds), length, then the raw bytes.
_ENTRY = struct.Struct("<dQ")

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

    def complete(
        self, command: KasminaCommand, success: bool, *, revised: bool = False
    ) -> None: ...


class CommandApplier(Protocol):
    """How one rank readies and applies commands the ranks agreed on.

    ``prepare`` runs before the agreement: "" when this rank can apply the command, else why not
    (it may block, bounded by the command's timeout: a GERMINATE's kernel fetch). ``apply``
    carries out the agreed commands in order and returns ``(ok, reason)`` for each; ``refuse``
    records a command this rank accepted that is applied nowhere. Both report the outcome to the
    handler (``complete``).

    An applier may also define ``revise(command, ok, reason)``: called on a rank whose outcome
    for an applied command was overturned by the replica repair (it ran here but failed on the
    majority, or the reverse), after the handler has been told (``revise_completion``), so the
    applier can correct its own records; and ``begin_sync()``: called at the start of every
    epoch sync, before any ``prepare`` (a time budget for the sync's prepares starts afresh).
    """

    def prepare(self, command: KasminaCommand) -> str: ...

    def apply(self, commands: Sequence[KasminaCommand]) -> list[tuple[bool, str]]: ...

    def refuse(self, command: KasminaCommand, reason: str) -> None: ...


@dataclass(frozen=True)
class CommandResult:
    """What became of one relayed command, the same list on every rank.

    Where execution differed between ranks, ``ok`` is the majority's outcome, which a repaired
    rank's state now reflects (``DistributedCoordinator.sync_epoch``).
    """

    command_id: str
    origin: int  # the rank that received (and first verified) it
    ok: bool  # applied (the verdict after any repair, the same on every rank)
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
        """Whether each relayed command was applied, in order: one verdict on every rank, which
        the state of every rank that agreed or was repaired reflects."""
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
        """Divergent ranks that still disagree after the repair."""
        return tuple(r for r in self.divergent_ranks if r not in self.repaired_ranks)


class ExecutorApplier:
    """A ``CommandApplier`` over a synchronous ``CommandExecutor`` (the handler's own): every
    command is ready at once and executed in turn. For stand-ins and simple executors; the
    kernel manager has its own (``kasmina.manager.coordination``)."""

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


def revise_completion(handler: RelayHandler, command: KasminaCommand, success: bool) -> None:
    """Report ``success`` for a command whose outcome was already reported as the opposite
    (the replica repair overturned it on this rank): the handler records it as revised, so
    each command is counted once, as it ended."""
    handler.complete(command, success, revised=True)


@dataclass
class Received:
    """A command this rank accepted, waiting for the next sync."""

    raw: bytes
    received_at: float
    command: KasminaCommand
    identity: bytes  # ``command_keys(raw)``, taken once on arrival: its identity,
    command_id: str = ""  # id
    content: bytes = b""  # and content


@dataclass
class Relayed:
    """A command as every rank reads it off the wire: its bytes, receive time, receiving rank."""

    raw: bytes
    received_at: float
    origin: int  # the rank that received (and first verified) it


class HeldCommands:
    """The commands one rank accepted for its next sync (at most ``max_pending``), in arrival
    order, and the identities of those still in their check (``arriving``): a sync relaying a
    command whose copy is checked here at that moment waits for it (``take``), for the copy's
    nonce is used already and the relayed one would be a replay here."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._lock = fork_safe(threading.Lock())
        self._arrived = fork_safe(threading.Condition(self._lock))
        self._held: list[Received] = []
        # Per key (identity or id), the checks under way under it, each by its arrival number.
        self._arriving: dict[bytes | str, set[int]] = {}
        self._arrivals = itertools.count()
        self.closed = False  # ``close``: no sync comes, and nothing is held any more

    @property
    def max_pending(self) -> int:
        return self._max_pending

    @max_pending.setter
    def max_pending(self, value: int) -> None:
        # An int >= 1: NaN or infinity compared False against every length, and so took the
        # bound off the held commands, silently (2.5 held 3).
        self._max_pending = check_positive_int("max_pending", value)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    @contextmanager
    def arriving(self, identity: bytes, command_id: str = "") -> Iterator[None]:
        """Around a command's check, until it is held or refused (``command_id``: a retry
        of a command the sync relays is its copy here too)."""
        keys = (identity, command_id) if command_id else (identity,)
        with self._lock:
            arrival = next(self._arrivals)
            for key in keys:
                self._arriving.setdefault(key, set()).add(arrival)
        try:
            yield
        finally:
            with self._lock:
                for key in keys:
                    checks = self._arriving[key]
                    checks.discard(arrival)
                    if not checks:
                        del self._arriving[key]
                self._arrived.notify_all()

    def add(self, entry: Received) -> bool:
        """Hold ``entry``; False (not held) when ``max_pending`` are held already, or closed."""
        with self._lock:
            if self.closed or len(self._held) >= self.max_pending:
                return False
            self._held.append(entry)
            return True

    def take_all(self) -> list[Received]:
        with self._lock:
            held, self._held = self._held, []
        return held

    def close(self) -> list[Received]:
        """Every command held, taken off; from now on none is (``add`` refuses): one accepted
        as its manager closed was held after the close took the others, for a sync that never
        came, counted accepted and never reported."""
        with self._lock:
            self.closed = True
            held, self._held = self._held, []
        return held

    def put_back(self, entries: list[Received]) -> list[Received]:
        """``entries`` (taken by a sync that applied none of them) before the others, in order;
        returns them instead once closed (no sync comes: the caller reports them)."""
        with self._lock:
            if self.closed:
                return entries
            self._held[:0] = entries
        return []

    def take(
        self, identity: bytes, command_id: str, content: bytes, wait_s: float
    ) -> Received | None:
        """The held copy of the command ``identity`` names, or a retry of it (``command_id``,
        saying ``content``), taken off, waiting at most ``wait_s`` for one still in its check;
        None if there is none (a command under its id that says something else stays held).

        Under the id, only the checks under way when it looks are waited for, never one that
        begins later: anyone can send bytes under a command's id (its id is no secret), and a
        flood of forgeries from a few threads kept one in its check at every moment, which held
        each sync for ``wait_s`` per relayed command. Under the command's own bytes, one that
        begins during the wait is waited for too: the copy itself, or it lost the race for its
        nonce to the relayed bytes and was refused on every rank at the next sync."""
        keys = (identity, command_id) if command_id else (identity,)

        def checked() -> bool:
            by_id = self._arriving.get(command_id, ()) if command_id else ()
            return identity not in self._arriving and begun.isdisjoint(by_id)

        with self._lock:
            begun = {arrival for key in keys for arrival in self._arriving.get(key, ())}
            if begun:
                self._arrived.wait_for(checked, wait_s)
            for i, entry in enumerate(self._held):
                if entry.identity == identity or (
                    command_id and entry.command_id == command_id and entry.content == content
                ):
                    return self._held.pop(i)
        return None


def frame(entries: Iterable[Received]) -> bytes:
    """The commands one rank received, as one body: per command its receive time (float64
    seconds), its length, then its raw bytes."""
    return b"".join(_ENTRY.pack(e.received_at, len(e.raw)) + e.raw for e in entries)


def unframe(body: bytes, count: int, origin: int) -> list[Relayed]:
    """The ``count`` commands ``origin`` framed into ``body``, in the order it received them."""
    out: list[Relayed] = []
    pos = 0
    for _ in range(count):
        received_at, n = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        out.append(Relayed(body[pos : pos + n], received_at, origin))
        pos += n
    if pos != len(body):
        raise RuntimeError(f"command exchange framing mismatch ({pos} != {len(body)} bytes)")
    return out


def refusal(column: Sequence[int]) -> str:
    """The reason, the same on every rank, a command is applied nowhere."""
    if DUPLICATE in column:  # judged alike on every rank
        return "not applied on any rank: " + _REFUSAL[DUPLICATE]
    parts = []
    for code in (UNVERIFIED, UNPREPARED):
        ranks = [r for r, c in enumerate(column) if c == code]
        if ranks:
            parts.append(f"rank(s) {ranks} {_REFUSAL[code]}")
    return "not applied on any rank: " + "; ".join(parts)


def split_refusal(column: Sequence[bool], source: int, repaired: tuple[int, ...]) -> str:
    """The reason, the same on every rank (built from gathered values only), a command that
    failed on the majority but ran on some ranks counts as not applied."""
    ran = [r for r, c in enumerate(column) if c]
    failed = [r for r, c in enumerate(column) if not c]
    undone = [r for r in ran if r in repaired]
    kept = [r for r in ran if r not in repaired]
    parts = [f"not applied: it failed on rank(s) {failed}"]
    if undone:
        parts.append(f"rank(s) {undone} that ran it were repaired from rank {source}")
    if kept:
        parts.append(f"rank(s) {kept} that ran it were not repaired")
    return "; ".join(parts)


def command_identity(raw: bytes) -> bytes:
    """What makes two received copies one command: the message they parse to, serialised
    deterministically (what its signature covers). Protobuf gives one message many encodings
    (a field repeated, fields reordered), and every one verifies; raw bytes that do not parse
    are their own identity."""
    try:
        return AdaptationCommand.FromString(raw).SerializeToString(deterministic=True)
    except Exception:
        return raw


def command_keys(raw: object, max_bytes: int | None = None) -> tuple[bytes, str, bytes]:
    """``(command_identity(raw), its command id, its content)`` from one parse. The content is
    what the command says without how it was signed (metadata cleared): a retry signed anew
    under the same id says the same; another command that reuses the id does not. What the
    door refuses unparsed (not bytes, or over ``max_bytes``) has no keys: ``(b"", "", b"")``."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return b"", "", b""
    if max_bytes is not None and memoryview(raw).nbytes > max_bytes:
        return b"", "", b""
    raw = bytes(raw)  # hashable, for the held commands' counts
    try:
        command = AdaptationCommand.FromString(raw)
    except Exception:
        return raw, "", raw
    identity = command.SerializeToString(deterministic=True)
    command.ClearField("metadata")
    return identity, command.command_id, command.SerializeToString(deterministic=True)


def relayed_command_id(raw: bytes) -> str:
    """The id of a relayed command, for the record ("" if it does not even parse)."""
    try:
        return AdaptationCommand.FromString(raw).command_id
    except Exception:
        return ""
