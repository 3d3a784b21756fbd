"""The one door through which a controller changes a running model.

``LeylineAdaptationHandler.handle_adaptation_command`` is strict and total: parse -> signature
-> freshness -> nonce -> semantic validation -> execute, and any failure is a ``False`` with a
reason counter and a ``command.rejected`` telemetry event. No exception escapes, whatever the
bytes. The handler does not import the kernel manager; it is handed a ``CommandExecutor``.

The two halves are also available apart, for an executor that applies commands later (the
kernel manager verifies on arrival, on any thread, and applies at the training thread's next safe
point, docs/design.md §5): ``accept`` runs every check and emits ``command.ack``; ``complete``
records the outcome and emits ``command.complete``. Both are thread-safe.
"""

from __future__ import annotations

import logging
import threading

from kasmina.control.auth import CommandVerifier
from kasmina.control.commands import (
    COMMAND_KINDS,
    CommandExecutor,
    KasminaCommand,
    to_kasmina_command,
)
from kasmina.leyline import AdaptationCommand
from kasmina.utils.telemetry import Event, TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "LOG_EVERY", "LeylineAdaptationHandler"]


DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024


LOG_EVERY = 1000  # rejections of one reason per warning logged


class LeylineAdaptationHandler:
    """Authenticates, validates and dispatches raw ``AdaptationCommand`` bytes.

    ``stats`` counts ``accepted`` (passed every check), ``executed`` (executor reported
    success), ``failed`` (executor reported failure or raised), ``rejected`` and
    ``rejected:<reason>`` per reason. Thread-safe: the counters are updated under a lock and the
    verifier's nonce ledger is itself thread-safe, so commands may arrive on any thread.
    """

    def __init__(
        self,
        verifier: CommandVerifier,
        executor: CommandExecutor,
        telemetry: TelemetryReporter | None = None,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.verifier = verifier
        self.executor = executor
        self.max_message_bytes = max_message_bytes
        self.stats: dict[str, int] = {"accepted": 0, "executed": 0, "failed": 0, "rejected": 0}
        self._telemetry = telemetry
        self._events = None if telemetry is None else _HandlerEvents(telemetry)
        self._stats_lock = threading.Lock()

    @property
    def telemetry(self) -> TelemetryReporter | None:
        """The reporter given at construction (its events are prepared once, so it is fixed)."""
        return self._telemetry

    def handle_adaptation_command(self, raw: bytes) -> bool:
        """Process one serialized command; True only if it was authentic, valid and succeeded."""
        command = self.accept(raw)
        if command is None:
            return False
        try:
            success = bool(self.executor.execute(command))
        except Exception:
            logger.exception("executor raised on command %s (%s)", command.command_id, command.kind)
            success = False
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
        try:
            return self._accept(raw)
        except Exception:  # the last line of defence: no input may raise out of here
            logger.exception("unexpected error while handling an adaptation command")
            try:
                self._reject("internal_error")
            except Exception:
                logger.debug("could not record an internal error", exc_info=True)
            return None

    def complete(self, command: KasminaCommand, success: bool) -> None:
        """Record the outcome of an accepted command (``executed`` / ``failed``, telemetry)."""
        with self._stats_lock:
            self.stats["executed" if success else "failed"] += 1
        if self._events is not None and self._events.enabled:
            event = self._events.complete[command.kind, success]
            event.emit(1.0 if success else 0.0, labels={"command_id": command.command_id})

    def _accept(self, raw: bytes) -> KasminaCommand | None:
        if isinstance(raw, memoryview):
            size = raw.nbytes
        elif isinstance(raw, (bytes, bytearray)):
            size = len(raw)
        else:
            return self._reject("malformed")
        if size > self.max_message_bytes:
            return self._reject("oversize")
        try:
            cmd = AdaptationCommand.FromString(raw if type(raw) is bytes else bytes(raw))
        except Exception:  # DecodeError, or anything the parser raises on hostile bytes
            return self._reject("malformed")

        ok, reason = self.verifier.verify(cmd)
        if not ok:
            return self._reject(reason)
        command = to_kasmina_command(cmd)
        if isinstance(command, str):
            return self._reject(command)
        with self._stats_lock:
            self.stats["accepted"] += 1
        if self._events is not None and self._events.enabled:
            self._events.ack[command.kind].emit(labels={"command_id": command.command_id})
        return command

    def _reject(self, reason: str) -> None:
        key = "rejected:" + reason
        with self._stats_lock:
            stats = self.stats
            stats["rejected"] += 1
            count = stats[key] = stats.get(key, 0) + 1
        # The first of each reason, then every LOG_EVERY-th: a flood of garbage cannot flood the
        # log, while the counters and telemetry still see every rejection.
        if count == 1 or count % LOG_EVERY == 0:
            logger.warning("rejected adaptation command: %s (%d so far)", reason, count)
        else:
            logger.debug("rejected adaptation command: %s", reason)
        if self._events is not None and self._events.enabled:
            self._events.rejected(reason).emit()
        return None


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
