"""The one door through which a controller changes a running model.

``LeylineAdaptationHandler.handle_adaptation_command`` is strict and total: parse -> signature
-> freshness -> nonce -> semantic validation -> execute, and any failure is a ``False`` with a
reason counter and a ``command.rejected`` telemetry event. No exception escapes, whatever the
bytes. The handler does not import the kernel manager; it is handed a ``CommandExecutor``.
"""

from __future__ import annotations

import logging

from kasmina.control.auth import CommandVerifier
from kasmina.control.commands import COMMAND_KINDS, CommandExecutor, to_kasmina_command
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
    ``rejected:<reason>`` per reason. Meant to be driven from one thread; the verifier's nonce
    ledger is itself thread-safe.
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

    @property
    def telemetry(self) -> TelemetryReporter | None:
        """The reporter given at construction (its events are prepared once, so it is fixed)."""
        return self._telemetry

    def handle_adaptation_command(self, raw: bytes) -> bool:
        """Process one serialized command; True only if it was authentic, valid and succeeded."""
        try:
            return self._handle(raw)
        except Exception:  # the last line of defence: no input may raise out of here
            logger.exception("unexpected error while handling an adaptation command")
            try:
                return self._reject("internal_error")
            except Exception:
                return False

    async def handle_adaptation_command_async(self, raw: bytes) -> bool:
        """Coroutine form for asyncio transports; runs the same steps inline."""
        return self.handle_adaptation_command(raw)

    def _handle(self, raw: bytes) -> bool:
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
        stats = self.stats
        stats["accepted"] += 1

        report = self._events is not None and self._events.enabled
        if report:
            self._events.ack[command.kind].emit(labels={"command_id": command.command_id})
        try:
            success = bool(self.executor.execute(command))
        except Exception:
            logger.exception("executor raised on command %s (%s)", command.command_id, command.kind)
            success = False
        stats["executed" if success else "failed"] += 1
        if report:
            event = self._events.complete[command.kind, success]
            event.emit(1.0 if success else 0.0, labels={"command_id": command.command_id})
        return success

    def _reject(self, reason: str) -> bool:
        stats = self.stats
        stats["rejected"] += 1
        key = "rejected:" + reason
        count = stats[key] = stats.get(key, 0) + 1
        # The first of each reason, then every LOG_EVERY-th: a flood of garbage cannot flood the
        # log, while the counters and telemetry still see every rejection.
        if count == 1 or count % LOG_EVERY == 0:
            logger.warning("rejected adaptation command: %s (%d so far)", reason, count)
        else:
            logger.debug("rejected adaptation command: %s", reason)
        if self._events is not None and self._events.enabled:
            self._events.rejected(reason).emit()
        return False


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
