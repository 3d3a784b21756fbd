"""The one door through which a controller changes a running model.

``LeylineAdaptationHandler.handle_adaptation_command`` is strict and total: parse -> signature
-> freshness -> nonce -> semantic validation -> execute, and any failure is a ``False`` with a
reason counter and a ``command.rejected`` telemetry event. No exception escapes, whatever the
bytes. The handler does not import the kernel manager; it is handed a ``CommandExecutor``.

The two halves are also available apart, for an executor that applies commands later (the
kernel manager verifies on arrival, on any thread, and applies at the training thread's next safe
point, docs/design.md §5): ``accept`` runs every check and emits ``command.ack``; ``complete``
records the outcome and emits ``command.complete``. Both are thread-safe.

Rejections are counted exactly (``stats``) but reported at a bounded rate, because they are what
an attacker controls: a flood of forgeries must not become a flood of log records or telemetry
packets. The first rejection of each reason is logged and emitted at once; after that, at most
one log record and one ``command.rejected`` event per reason per ``rejection_report_interval_s``
carry the count since the previous one (the event's value), and ``flush_rejections`` reports
what is still pending (the manager calls it at each epoch boundary and on close).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable

from kasmina.control.auth import CommandVerifier
from kasmina.control.commands import (
    COMMAND_KINDS,
    CommandExecutor,
    KasminaCommand,
    to_kasmina_command,
)
from kasmina.leyline import AdaptationCommand
from kasmina.utils.checks import check_positive_int
from kasmina.utils.locks import fork_safe
from kasmina.utils.ratelimit import rarely
from kasmina.utils.telemetry import Event, TelemetryReporter

logger = logging.getLogger(__name__)

# Commands handed over as something other than bytes (a caller's mistake, said plainly).
_NOT_BYTES = itertools.count(1)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "REJECTION_REPORT_INTERVAL_S",
    "LeylineAdaptationHandler",
]


DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024

# Seconds between two reports (log record + telemetry event) of one rejection reason: a flood
# costs at most one of each per reason per interval, however fast it arrives.
REJECTION_REPORT_INTERVAL_S = 10.0

# One rejection report: (reason, count since the last report, total so far, time of the last
# report or None for the first of its reason).
_Report = tuple[str, int, int, float | None]


class LeylineAdaptationHandler:
    """Authenticates, validates and dispatches raw ``AdaptationCommand`` bytes.

    ``stats`` counts ``accepted`` (passed every check), ``executed`` (executor reported
    success), ``failed`` (executor reported failure or raised), ``rejected`` and
    ``rejected:<reason>`` per reason. Thread-safe: the counters are updated under a lock and the
    verifier's nonce ledger is itself thread-safe, so commands may arrive on any thread; each
    read of ``stats`` is a copy taken under that lock (one moment's counts, which an exporter
    may walk while commands arrive and complete).

    Rejections are reported (logged, and emitted as ``command.rejected``) at a bounded rate: the
    first of each reason at once, then the count since the last report at most once per
    ``rejection_report_interval_s`` per reason, measured on ``clock`` (monotonic seconds).
    """

    def __init__(
        self,
        verifier: CommandVerifier,
        executor: CommandExecutor,
        telemetry: TelemetryReporter | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        rejection_report_interval_s: float = REJECTION_REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        interval = rejection_report_interval_s
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            raise TypeError(f"rejection_report_interval_s must be a number, got {interval!r}")
        if not (0 < interval <= 86_400 and math.isfinite(interval)):
            raise ValueError(
                f"rejection_report_interval_s must be in (0, 86400] seconds, got {interval!r}"
            )
        self.verifier = verifier
        self.executor = executor
        self.max_message_bytes = max_message_bytes  # checked by its setter
        self.rejection_report_interval_s = float(interval)
        self._stats: dict[str, int] = {"accepted": 0, "executed": 0, "failed": 0, "rejected": 0}
        self._telemetry = telemetry
        self._events = None if telemetry is None else _HandlerEvents(telemetry)
        self._stats_lock = fork_safe(threading.Lock())
        self._clock = clock
        # Rejection reporting, under _stats_lock: when each reason was last reported, how many
        # of it arrived since, and the earliest time one of those counts falls due.
        self._reported_at: dict[str, float] = {}
        self._unreported: dict[str, int] = {}
        self._next_due = math.inf
        self._closed = False  # ``close``: every later command is refused, reason ``closed``

    @property
    def max_message_bytes(self) -> int:
        """The largest command accepted, in bytes (larger: ``oversize``, refused unparsed)."""
        return self._max_message_bytes

    @max_message_bytes.setter
    def max_message_bytes(self, value: int) -> None:
        # An int >= 1: NaN or infinity compared False against every size, and so took off the
        # bound that keeps a flood of huge messages from the parser, silently.
        self._max_message_bytes = check_positive_int("max_message_bytes", value)

    @property
    def stats(self) -> dict[str, int]:
        """The counters (the class doc), copied under their lock: the live dict, walked on another
        thread as a rejection of a new reason added its key, raised "dictionary changed size
        during iteration", and its counts could be read from two moments."""
        with self._stats_lock:
            return dict(self._stats)

    @property
    def telemetry(self) -> TelemetryReporter | None:
        """The reporter given at construction (its events are prepared once, so it is fixed)."""
        return self._telemetry

    def handle_adaptation_command(self, raw: bytes) -> bool:
        """Process one serialized command; True only if it was authentic, valid and succeeded."""
        command = self._accept(raw, None)
        if command is None:
            return False
        try:
            success = bool(self.executor.execute(command))
        except Exception:
            logger.exception("executor raised on command %s (%s)", command.command_id, command.kind)
            success = False
        except BaseException:  # an interrupt propagates, with the command counted: failed here
            self.complete(command, False)  # (the executor's own log says how it ended)
            raise
        self.complete(command, success)
        return success

    async def handle_adaptation_command_async(self, raw: bytes) -> bool:
        """Coroutine form for asyncio transports; runs the same steps inline."""
        return self.handle_adaptation_command(raw)

    def accept(self, raw: bytes) -> KasminaCommand | None:
        """Every check of one serialized command; the verified command, or None (rejected).

        Counts it ``accepted`` and emits ``command.ack``; the caller must later report the
        outcome with ``complete``. Never raises, whatever the bytes.
        """
        return self._accept(raw, None)

    def accept_relayed(self, raw: bytes, received_at: float) -> KasminaCommand | None:
        """``accept`` for a command another rank of the same job received at ``received_at``
        (its verifier's clock) and relayed here to be applied at a safe point all ranks share.

        Every check runs again except that freshness is judged against ``received_at`` rather
        than now (``CommandVerifier.verify_relayed``): the safe point may come long after the
        command arrived, while the signature still decides, on this rank, what is obeyed.
        """
        return self._accept(raw, received_at)

    def complete(self, command: KasminaCommand, success: bool, *, revised: bool = False) -> None:
        """Record the outcome of an accepted command (``executed`` / ``failed``, telemetry).
        ``revised``: it was recorded before as the opposite (a multi-rank repair overturned it
        on this rank), so that count moves rather than adds."""
        with self._stats_lock:
            self._stats["executed" if success else "failed"] += 1
            earlier = "failed" if success else "executed"
            if revised and self._stats.get(earlier, 0) > 0:
                self._stats[earlier] -= 1
        events = self._events
        if events is not None and events.enabled:
            event = events.complete[command.kind, success]
            labels = {"command_id": command.command_id}
            if revised:  # the same command's second event: its earlier outcome was overturned
                labels["revised"] = "true"
            event.post(1.0 if success else 0.0, labels=labels)

    def _accept(self, raw: bytes, received_at: float | None) -> KasminaCommand | None:
        """The checks, in the order docs/design.md §5 gives (after ``closed``); never raises.

        The accepting path does no logging and no string formatting: only rejections are
        reported, and at a bounded rate (``_reject``).
        """
        try:
            if self._closed:
                return self._reject("closed")
            if type(raw) is bytes:
                size = len(raw)
            elif isinstance(raw, memoryview):
                size = raw.nbytes
            elif isinstance(raw, (bytes, bytearray)):
                size = len(raw)
            else:
                n = next(_NOT_BYTES)
                logger.log(
                    rarely(n, 1000),
                    "a command must be the serialized bytes of a signed AdaptationCommand, not "
                    "%s (call SerializeToString(); a manager's handle_leyline_command takes the "
                    "message) [%d so far]",
                    type(raw).__name__,
                    n,
                )
                return self._reject("malformed")
            if size > self._max_message_bytes:
                return self._reject("oversize")
            try:
                cmd = AdaptationCommand.FromString(raw if type(raw) is bytes else bytes(raw))
            except Exception:  # DecodeError, or anything the parser raises on hostile bytes
                return self._reject("malformed")
            # The message was parsed here and is dropped after validation: ``owned``.
            if received_at is None:
                reason = self.verifier.check(cmd, owned=True)
            else:
                reason = self.verifier.check(cmd, float(received_at), owned=True)
            if reason:
                return self._reject(reason)
            command = to_kasmina_command(cmd)
            if type(command) is str:
                return self._reject(command)
            with self._stats_lock:
                self._stats["accepted"] += 1
            events = self._events
            if events is not None and events.enabled:
                events.ack[command.kind].post(labels={"command_id": command.command_id})
            return command
        except Exception:  # the last line of defence: no input may raise out of here
            logger.exception("unexpected error while handling an adaptation command")
            try:
                self._reject("internal_error")
            except Exception:
                logger.debug("could not record an internal error", exc_info=True)
            return None

    def close(self) -> None:
        """Refuse every later command with the reason ``closed``, before any other check: its
        executor is shutting down (the kernel manager closes its handler when it closes)."""
        self._closed = True

    def flush_rejections(self, *, force: bool = False) -> None:
        """Report rejection counts that are due (``force``: every pending count, due or not).

        A count is otherwise reported by the next rejection arriving after its interval; call
        this when a flood may have stopped (the manager does at each epoch boundary, and with
        ``force`` on close) so the tail of the count is not left unreported.
        """
        now = self._clock()
        with self._stats_lock:
            if not force and now < self._next_due:
                return
            reports = self._take_due(now, force)
        self._report(reports, now)

    def _reject(self, reason: str) -> None:
        key = "rejected:" + reason
        now = self._clock()
        reports: list[_Report] = []
        with self._stats_lock:
            stats = self._stats
            stats["rejected"] += 1
            total = stats[key] = stats.get(key, 0) + 1
            last = self._reported_at.get(reason)
            if last is None:  # the first of its reason: reported now
                self._reported_at[reason] = now
                reports.append((reason, 1, total, None))
            else:
                pending = self._unreported[reason] = self._unreported.get(reason, 0) + 1
                if pending == 1:
                    self._next_due = min(self._next_due, last + self.rejection_report_interval_s)
            if now >= self._next_due:
                reports += self._take_due(now, False)
        if reports:
            self._report(reports, now)
        return None

    def _take_due(self, now: float, force: bool) -> list[_Report]:
        """Pending counts that are due (all with ``force``), reset; call under _stats_lock."""
        interval = self.rejection_report_interval_s
        due: list[_Report] = []
        next_due = math.inf
        for reason, count in list(self._unreported.items()):
            last = self._reported_at[reason]
            if force or now >= last + interval:
                due.append((reason, count, self._stats["rejected:" + reason], last))
                self._reported_at[reason] = now
                del self._unreported[reason]
            else:
                next_due = min(next_due, last + interval)
        self._next_due = next_due
        return due

    def _report(self, reports: list[_Report], now: float) -> None:
        """Log and emit ``(reason, count since last report, total, last report time)``."""
        events = self._events if self._events is not None and self._events.enabled else None
        for reason, count, total, last in reports:
            if last is None:
                logger.warning(
                    "rejected adaptation command: %s (further rejections of this reason are "
                    "summarised at most every %gs)",
                    reason,
                    self.rejection_report_interval_s,
                )
            else:
                logger.warning(
                    "rejected %d more adaptation command(s) in %.1fs: %s (%d in all)",
                    count,
                    now - last,
                    reason,
                    total,
                )
            if events is not None:
                events.rejected(reason).emit(float(count))


class _HandlerEvents:
    """The handler's telemetry events, prepared once per reporter (see ``telemetry.Event``)."""

    def __init__(self, reporter: TelemetryReporter) -> None:
        self.reporter = reporter
        self.ack = {
            kind: reporter.event("command.ack", labels={"kind": kind}) for kind in COMMAND_KINDS
        }
        self.complete = {
            (kind, ok): reporter.event(
                "command.complete", labels={"kind": kind, "success": "true" if ok else "false"}
            )
            for kind in COMMAND_KINDS
            for ok in (True, False)
        }
        self._rejected: dict[str, Event] = {}

    @property
    def enabled(self) -> bool:
        return self.reporter.enabled

    def rejected(self, reason: str) -> Event:
        event = self._rejected.get(reason)
        if event is None:
            event = self._rejected[reason] = self.reporter.event(
                "command.rejected", labels={"reason": reason}
            )
        return event
