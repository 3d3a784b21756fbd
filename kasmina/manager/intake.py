"""A command's path through the manager, from arrival to its safe point (docs/design.md §5).

Commands arrive on any thread at any time; the model changes only on the training thread.
``CommandIntake`` is that path, between the manager's doors and ``CommandExecution``:

- **arrival** (``arrive``, any thread): the handler's ``accept`` verifies the bytes (size,
  parse, signature, freshness, nonce, ranges) and the command goes on the bounded
  ``CommandQueue`` (``kasmina.manager.pending``); a full or closed queue refuses it at once;
- **safe point** (``apply_pending``, the training thread): the ready commands' nonces are made
  durable first (if that fails, every one of them is refused), then each is applied in arrival
  order under the manager's lock, and its completion reported to the handler;
- **at once** (``execute``): a verified command carried out by code already at a safe point.

``command_verifier`` builds the run's verifier with its durable nonce ledger. The intake holds
the handler, verifier, queue, executor, report, lock and timers it is given, never the manager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from kasmina.control.auth import CommandVerifier
from kasmina.control.commands import KasminaCommand
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.control.ledger import NonceLedger
from kasmina.leyline import AdaptationCommand
from kasmina.manager.config import KasminaConfig
from kasmina.manager.executor import CommandExecution, CommandOutcome
from kasmina.manager.pending import CommandQueue
from kasmina.manager.report import ManagerReport
from kasmina.utils.keyring import Keyring
from kasmina.utils.perfstats import LatencyStats

logger = logging.getLogger(__name__)

__all__ = ["CommandIntake", "command_verifier"]


def command_verifier(config: KasminaConfig, keyring: Keyring) -> CommandVerifier:
    """The verifier of this run's commands, with its durable nonce ledger unless disabled."""
    path = config.nonce_ledger_path
    if path is None:
        logger.warning(
            "nonce_ledger is off: a command captured less than %gs before a restart can be "
            "replayed after it",
            config.command_freshness_s,
        )
        ledger = None
    else:
        ledger = NonceLedger(path, durability=config.nonce_ledger_durability)
    try:
        return CommandVerifier(
            keyring,
            config.command_freshness_s,
            key_ids=config.command_key_ids or None,
            ledger=ledger,
            defer_sync=True,  # fdatasync once per safe point, before the commands apply
        )
    except BaseException:
        if ledger is not None:
            ledger.close()
        raise


class CommandIntake:
    """Verifies commands on arrival, queues them, and applies them at a safe point.

    ``lock`` is the manager's lock, held while commands apply; ``perf`` its timers (``overhead``
    for arrival, ``command`` for each command applied).
    """

    def __init__(
        self,
        handler: LeylineAdaptationHandler,
        verifier: CommandVerifier,
        queue: CommandQueue,
        execution: CommandExecution,
        report: ManagerReport,
        *,
        lock: threading.RLock,
        perf: Mapping[str, LatencyStats],
    ) -> None:
        self.handler = handler
        self.verifier = verifier
        self.queue = queue
        self.execution = execution
        self.report = report
        self.lock = lock
        self.perf = perf
        # One safe point at a time takes and applies: two at once would take the same commands.
        self._applying = threading.Lock()

    def arrive(self, raw: bytes) -> bool:
        """Verify ``raw`` now and queue it; whether it was accepted. Any thread; never raises."""
        started = time.perf_counter_ns()
        command = self.handler.accept(raw)
        accepted = command is not None and self._enqueue(command)
        self.perf["overhead"].add_ns(time.perf_counter_ns() - started)
        return accepted

    def _enqueue(self, command: KasminaCommand) -> bool:
        if self.queue.submit(command):
            return True
        reason = f"command queue full ({self.queue.max_pending} pending) or closed"
        logger.warning("command %s dropped: %s", command.command_id, reason)
        self.handler.complete(command, False)
        with self.lock:
            self.report.note_command(command, False, reason)
        return False

    def apply_pending(self, *, wait: bool = False) -> list[CommandOutcome]:
        """Apply every queued command that is ready, in arrival order (see
        ``KasminaKernelManager.apply_pending``). While another thread is applying, a call
        that does not ``wait`` returns at once (that thread applies what is ready), and one
        that waits waits its turn."""
        if not self._applying.acquire(blocking=wait):
            return []
        try:
            return self._take_and_apply(wait)
        finally:
            self._applying.release()

    def _take_and_apply(self, wait: bool) -> list[CommandOutcome]:
        ready = self.queue.take_ready(wait=wait)
        if not ready:
            return []
        outcomes = []
        try:
            # Their nonces reach the disk before any of them takes effect (docs/design.md §5).
            self.verifier.make_durable()
            not_durable = ""
        except OSError as exc:
            not_durable = f"its nonce could not be made durable: {exc}"
            logger.error("nonce ledger: %s; refusing %d command(s)", exc, len(ready))
        with self.lock:
            for entry, original, error in ready:
                command = entry.command
                started = time.perf_counter_ns()
                try:
                    if not_durable:
                        outcome = self.refuse(command, not_durable)
                    else:
                        outcome = self.execution.apply(
                            command, original=original, fetch_error=error
                        )
                except Exception as exc:  # a bug in execution must not stop the training step
                    logger.exception("applying command %s raised", command.command_id)
                    outcome = self.refuse(command, f"internal error: {type(exc).__name__}: {exc}")
                self.perf["command"].add_ns(time.perf_counter_ns() - started)
                self.handler.complete(command, outcome.ok)
                outcomes.append(outcome)
        return outcomes

    def drop_pending(self) -> None:
        """Close the queue: every command still in it is reported refused, none applied."""
        for entry in self.queue.close():
            self.handler.complete(entry.command, False)
            self.report.note_command(entry.command, False, "manager closed before it applied")

    def refuse(self, command: KasminaCommand, reason: str) -> CommandOutcome:
        """Report ``command`` refused for ``reason`` (nothing changed); its outcome."""
        self.report.note_command(command, False, reason)
        return CommandOutcome(command.command_id, command.kind, "", False, reason)

    def execute(self, command: KasminaCommand) -> bool:
        """Carry out a verified command at once, its nonce made durable first (safe point only)."""
        try:
            self.verifier.make_durable()
        except OSError as exc:
            self.refuse(command, f"its nonce could not be made durable: {exc}")
            return False
        with self.lock:
            return self.execution.execute(command)

    def verify_auth(self, message: Any) -> bool:
        """Signature, freshness and nonce of a command (object or bytes), its nonce unused."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            try:
                message = AdaptationCommand.FromString(bytes(message))
            except Exception:
                return False
        if not isinstance(message, AdaptationCommand):
            return False
        return self.verifier.verify(message, record_nonce=False)[0]
