"""A command's path through the manager, from arrival to its safe point (docs/design.md §5).

Commands arrive on any thread at any time; the model changes only on the training thread.
``CommandIntake`` is that path, between the manager's doors and ``CommandExecution``:

- **arrival** (``arrive``, any thread): the handler's ``accept`` verifies the bytes (size,
  parse, signature, freshness, nonce, ranges) and the command goes on the bounded
  ``CommandQueue`` (``kasmina.manager.pending``); a full or closed queue refuses it at once;
- **safe point** (``apply_pending``, the training thread): the ready commands' nonces are made
  durable first (if that fails, every one of them is refused), then each is applied in arrival
  order under the manager's lock, and its completion reported to the handler. An interrupt
  (``KeyboardInterrupt``, ``SystemExit``) propagates, but every command taken still gets an
  outcome or goes back to the queue (``_take_and_apply``);
- **at once** (``execute``): a verified command carried out by code already at a safe point.

``command_verifier`` builds the run's verifier with its durable nonce ledger. The intake holds
the handler, verifier, queue, executor, report, lock and timers it is given, never the manager.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kasmina.control.auth import CommandVerifier
from kasmina.control.commands import KasminaCommand
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.control.ledger import LEDGER_FILE_NAME, NonceLedger
from kasmina.leyline import AdaptationCommand, SeedOperation
from kasmina.manager.config import KasminaConfig
from kasmina.manager.executor import CommandExecution, CommandOutcome
from kasmina.manager.pending import CommandQueue, PendingCommand, Ready
from kasmina.manager.report import ManagerReport
from kasmina.urza.kernel import GPUKernel
from kasmina.utils.interrupts import interrupts_deferred, take_lock
from kasmina.utils.keyring import Keyring
from kasmina.utils.locks import fork_safe
from kasmina.utils.perfstats import LatencyStats
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["CommandIntake", "CommandRelay", "command_bytes", "command_verifier"]

# Seed operations that release the seed's kernel (HARVESTING, TERMINATED): a forward's graph
# still alive uses it.
_RELEASING = (SeedOperation.SEED_OPERATION_CULL, SeedOperation.SEED_OPERATION_TERMINATE)

# What takes the door's commands while the manager is one rank of a multi-rank run (a
# ``DistributedCoordinator``'s ``submit``: verified there, held for the ranks' next sync).
CommandRelay = Callable[[bytes], bool]


def command_bytes(command: object, *, signed_bytes: bool = False) -> bytes:
    """The bytes a manager's async doors queue: an ``AdaptationCommand``'s, or (``signed_bytes``,
    ``handle_optimizer_command``'s door) the signed bytes given. Anything else, a bare
    ``OptimizerCommand`` (unsigned) included, is a ``TypeError``: applying one would open a door
    around the verifier (design §5)."""
    if signed_bytes and isinstance(command, (bytes, bytearray, memoryview)):
        return bytes(command)
    if isinstance(command, AdaptationCommand):
        return command.SerializeToString()
    if signed_bytes:
        raise TypeError(
            f"expected a signed AdaptationCommand (or its bytes), got {type(command).__name__}"
            "; sign an optimizer command with make_optimizer_command + sign_command"
        )
    raise TypeError(f"expected an AdaptationCommand, got {type(command).__name__}")


def command_verifier(config: KasminaConfig, keyring: Keyring) -> CommandVerifier:
    """The verifier of this run's commands, with its durable nonce ledger unless disabled."""
    path, usual = config.nonce_ledger_path, config.run_dir / LEDGER_FILE_NAME
    if path != usual and usual.is_file():  # a restart whose ledger moved: replays reopen
        logger.warning(
            "run %s recorded its commands' nonces in %s, but this trainer records them %s: a "
            "command the run accepted less than %gs before this restart can be replayed now",
            config.run_id, usual, "in memory only" if path is None else f"in {path}",
            config.command_freshness_s,
        )  # fmt: skip
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
        self._applier: int | None = None  # the thread applying, whose own calls return at once
        self.deferred = 0  # calls that found a forward's graph open, and applied nothing
        self.dropped = 0  # commands refused on arrival for a full or closed queue
        # Who else holds accepted commands for this manager (a ``DistributedKasmina``'s
        # coordinator): each is told to refuse them when the manager closes.
        self.also_dropping: list[Callable[[str], None]] = []
        self.relayed: str | None = None  # why this queue takes no arrival (``relay``)
        self._door = fork_safe(threading.Lock())
        fork_safe(self)  # ``_at_fork_reinit``

    def _at_fork_reinit(self) -> None:
        """After ``fork()``, in the child: a safe point that another thread of the parent was
        in (one waiting for a fetch, ``apply_pending(wait=True)``) never ends there, and held
        every safe point of the child off for good (the commands stayed queued). It is let go;
        what it waited for is asked for again (``CommandQueue._at_fork_reinit``). One the
        forking thread is in itself goes on in the child, and keeps it (its end releases it)."""
        if self._applier != threading.get_ident():  # (the forking thread keeps its ident)
            self._applying._at_fork_reinit()
            self._applier = None

    def arrive(self, raw: bytes) -> bool:
        """Verify ``raw`` now and queue it; whether it was accepted. Any thread; never raises.
        A Ctrl-C waits until the command is queued or refused: between its nonce's use and the
        queue it was lost (counted accepted, never reported)."""
        started = time.perf_counter_ns()
        with interrupts_deferred():
            command = self.handler.accept(raw)
            accepted = command is not None and self._enqueue(command)
        self.perf["overhead"].add_ns(time.perf_counter_ns() - started)
        return accepted

    def _enqueue(self, command: KasminaCommand) -> bool:
        with self._door:  # against ``relay``: queued before it takes the queue, or refused
            relayed = self.relayed
            if not relayed and self.queue.submit(command):
                return True
        reason = relayed or f"command queue full ({self.queue.max_pending} pending) or closed"
        self.dropped += 1  # a flood is logged rarely (each drop is reported and counted)
        logger.log(
            rarely(self.dropped, 1000), "command %s dropped: %s [%d dropped so far]",
            command.command_id, reason, self.dropped,
        )  # fmt: skip
        with self.lock:  # logged first: a sink reading command_log at the complete finds it
            self.report.note_command(command, False, reason)
        self.handler.complete(command, False)
        return False

    def apply_pending(
        self, *, wait: bool = False, graph_open: bool = False
    ) -> list[CommandOutcome]:
        """Apply every queued command that is ready, in arrival order (see
        ``KasminaKernelManager.apply_pending``). While another thread is applying, a call
        that does not ``wait`` returns at once (that thread applies what is ready), and one
        that waits waits its turn; a call from inside the application on its own thread (a
        telemetry sink's, a hook's) returns at once, waiting or not: it would wait on itself.
        ``graph_open`` (a forward's graph may be alive: not a safe point) applies nothing."""
        if graph_open:
            self.deferred += 1
            logger.log(
                rarely(self.deferred, 1000),
                "a safe point after a forward through a slot that recorded a graph, "
                "before the step's end: nothing applied, the commands wait for step() (a "
                "forward under torch.no_grad() leaves no graph) [%d such calls]", self.deferred,
            )  # fmt: skip
            return []
        if self._applier == threading.get_ident() or not (wait or len(self.queue)):
            return []  # (nothing queued: every step's case, no hold and no lock taken)
        taken = False
        try:
            # Taken with a SIGINT held, delivered inside this ``try``: a Ctrl-C just after a
            # plain ``acquire`` left it taken for good, and every later safe point applied
            # nothing (a waiting call still takes a Ctrl-C while it waits: ``take_lock``).
            hold = interrupts_deferred()
            with hold:
                if wait:
                    take_lock(self._applying, hold)
                    taken = True
                else:
                    taken = self._applying.acquire(blocking=False)
            if not taken:
                return []
            self._applier = threading.get_ident()
            return self._take_and_apply(wait)
        finally:
            if taken:
                self._applier = None
                self._applying.release()

    def _take_and_apply(self, wait: bool) -> list[CommandOutcome]:
        """Take the ready commands, make their nonces durable, apply and report each.

        An interrupt (a ``BaseException`` that is not an ``Exception``: each command's own
        errors are its refusal) propagates, and no command taken is lost to it:

        - while they are taken and their nonces made durable (a SIGINT is held until both are
          done, and lands where this puts them back): none of the commands began, and the
          verifier syncs their nonces again at its next call, so they all go back to the front
          of the queue, in order;
        - while a command applies: its operation undoes or completes itself and it is reported
          with that outcome (``CommandExecution.apply``). It is not queued again: its nonce is
          durable, it may have taken effect, and a command interrupted because it hung would
          hang again. Cut short between its own bookkeeping steps, before its outcome was
          noted, it is reported refused for the same reasons; after, with the outcome noted;
        - the commands behind it never began and their nonces are durable: they go back to the
          front of the queue, in order, and the next safe point applies them (refused if the
          manager closed meanwhile, or if their nonces could not be made durable).
        """
        polled = self.queue.poll_ready(wait=wait)  # waits for fetches: a Ctrl-C takes none
        if not polled:
            return []
        ready: list[Ready] = []
        outcomes: list[CommandOutcome] = []  # one per command reported, in order
        began, not_durable = -1, ""  # the index of the last command whose application began
        try:
            # Taken and made durable with a SIGINT held: delivered at the block's end, it lands
            # in the ``except`` below, which puts them back, never between the two.
            with interrupts_deferred():
                ready = self.queue.take(polled)
                not_durable = self._make_durable(ready)
            with self.lock:
                for index, (entry, original, error) in enumerate(ready):
                    began = index
                    blocked = not_durable or self.blocked()
                    if blocked:
                        refused = self.refuse(entry.command, blocked)
                        self._report(entry.command, refused, outcomes)
                    else:
                        self._apply_one(entry.command, original, error, outcomes)
        except BaseException as exc:
            rest = [entry for entry, _, _ in ready[len(outcomes) :]]
            if not_durable:
                self._drop(rest, not_durable)
            else:
                if rest and began == len(outcomes):  # cut short as it applied
                    cut, rest = rest[0], rest[1:]
                    noted = self.report.noted(cut.command)
                    if noted is None:  # before its outcome was known: refused
                        name = type(exc).__name__
                        self._drop([cut], f"interrupted by {name} while it applied (see the log)")
                    else:  # after ``apply`` noted it: that outcome stands, reported once
                        self.handler.complete(cut.command, noted)
                self._drop(self.queue.put_back(rest), "manager closed before it applied")
            raise
        finally:  # their kernels' pins: the seeds that took one hold pins of their own
            # Given back whole (a pin leaked is never evicted): with a SIGINT held, and again
            # if one lands as the hold begins (each entry is given back once).
            try:
                with interrupts_deferred():
                    self.queue.release([entry for entry, _, _ in ready])
            except BaseException:
                self.queue.release([entry for entry, _, _ in ready])
                raise
        return outcomes

    def _make_durable(self, ready: list[Ready]) -> str:
        """Make the nonces of the ``ready`` commands durable: "" once they are, else why not
        (each is then refused). An interrupt puts them back in the queue (``_take_and_apply``):
        none of them began, and the verifier syncs their nonces again at its next call."""
        if not ready:
            return ""
        try:
            # Their nonces reach the disk before any of them takes effect (docs/design.md §5).
            self.verifier.make_durable()
        except OSError as exc:
            logger.error("nonce ledger: %s; refusing %d command(s)", exc, len(ready))
            # Refused before they could act: the controller's retries keep their ids.
            taken = [entry.command for entry, _, _ in ready]
            self.verifier.release_ids((c.command_id, c.issued_at) for c in taken)
            return f"its nonce could not be made durable: {exc}"
        return ""

    def _apply_one(
        self,
        command: KasminaCommand,
        original: GPUKernel | None,
        error: BaseException | None,
        outcomes: list[CommandOutcome],
    ) -> None:
        """Apply one command and report it; its outcome joins ``outcomes`` once reported, also
        when an interrupt cuts it short (the interrupt then propagates)."""
        started = time.perf_counter_ns()
        try:
            outcome = self.execution.apply(
                command,
                original=original,
                fetch_error=error,
                on_interrupt=lambda interrupted: self._report(command, interrupted, outcomes),
            )
        except Exception as exc:  # a bug in execution must not stop the training step
            logger.exception("applying command %s raised", command.command_id)
            outcome = self.refuse(command, f"internal error: {type(exc).__name__}: {exc}")
        try:
            self.perf["command"].add_ns(time.perf_counter_ns() - started)
        finally:  # noted by ``apply``: reported even if an interrupt lands here
            self._report(command, outcome, outcomes)

    def _report(
        self, command: KasminaCommand, outcome: CommandOutcome, outcomes: list[CommandOutcome]
    ) -> None:
        """Report ``outcome`` to the handler and add it to ``outcomes``; added even when the
        report is interrupted (a sink that raises), since the handler counted it first; a
        Ctrl-C waits until both are done (between them it would leave the command uncounted)."""
        with interrupts_deferred():
            try:
                self.handler.complete(command, outcome.ok)
            finally:
                outcomes.append(outcome)

    def drop_pending(self) -> None:
        """Close the intake (the manager is closing): the handler refuses every later command
        at the door (reason ``closed``), and every command still queued, here or held by a
        multi-rank coordinator for its next sync (``also_dropping``), is reported refused, none
        applied."""
        self.handler.close()
        reason = "manager closed before it applied"
        self._drop(self.queue.close(), reason)
        for drop in list(self.also_dropping):
            drop(reason)

    def relay(self, reason: str | None, holders: Sequence[Callable[[str], None]] = ()) -> None:
        """The manager joined a multi-rank run (``reason``; None: it left it), whose coordinator
        takes its commands from now on: every command queued here is refused for ``reason``,
        none applied, and so is one that reaches this queue later (verified by a door read
        before the switch): applied here alone, it would apply on this rank only. ``holders``
        hold its accepted commands meanwhile: each is told to refuse them when the manager
        closes (``also_dropping``), from the join until the leave."""
        if reason:
            self.also_dropping.extend(holders)
        with self._door:
            self.relayed = reason
            entries = self.queue.take_all() if reason else []
        self._drop(entries, reason or "")
        if not reason:
            for drop in holders:
                if drop in self.also_dropping:
                    self.also_dropping.remove(drop)

    def _drop(self, entries: list[PendingCommand], reason: str) -> None:
        """Report each of ``entries`` refused for ``reason``, none applied."""
        self.queue.release(entries)
        for entry in entries:
            with self.lock:  # logged before its complete, as an applied command is
                self.report.note_command(entry.command, False, reason)
            self.handler.complete(entry.command, False)

    def refuse(self, command: KasminaCommand, reason: str) -> CommandOutcome:
        """Report ``command`` refused for ``reason`` (nothing changed); its outcome."""
        self.report.note_command(command, False, reason)
        target = command.seed.seed_id if command.seed is not None else command.kind
        return CommandOutcome(command.command_id, command.kind, target, False, reason)

    def blocked(self) -> str:
        """Why no command can apply now, checked before each one ("" when one can): the manager
        was closed (by a sink or another thread while earlier commands applied), or a slot was
        taken out of the model (``SlotRegistry.check_held``: a detach or merge)."""
        state = self.execution.state
        try:
            state.require_open()
            if state.registry is not None:
                state.registry.check_held(state.optimizers)
        except RuntimeError as exc:
            return str(exc)
        return ""

    def execute(self, command: KasminaCommand) -> bool:
        """Carry out a verified command at once, its nonce made durable first (safe point only).
        A closed manager raises ``RuntimeError`` before anything changes (``require_open``); a
        model a slot was taken out of refuses it (``blocked``), and so does a forward's graph
        that may be alive (``_unsafe_now``); anything but a ``KasminaCommand`` is a
        ``TypeError``, before anything changes."""
        if not isinstance(command, KasminaCommand):
            raise TypeError(f"execute takes a KasminaCommand, got {type(command).__name__}")
        self.execution.state.require_open()
        blocked = self.blocked() or self._unsafe_now(command)
        if self.relayed:  # carried out here alone, it would apply on this rank only
            blocked = (
                "executed directly on one rank of a multi-rank run, where a command applies on "
                "every rank or none: send it to the manager's handle_adaptation_command"
            )
        if blocked:
            self.refuse(command, blocked)
            return False
        try:
            self.verifier.make_durable()
        except OSError as exc:
            self.verifier.release_ids([(command.command_id, command.issued_at)])  # never acted
            self.refuse(command, f"its nonce could not be made durable: {exc}")
            return False
        with self.lock:
            # Again under the lock: a close() on another thread may have taken it since (while
            # the nonce was made durable), and a command run then grafted into a released model.
            # It raises as on any closed manager, its id freed for a retry (it never acted).
            if self.execution.state.closed:
                self.verifier.release_ids([(command.command_id, command.issued_at)])
            self.execution.state.require_open()
            return self.execution.execute(command)

    def _unsafe_now(self, command: KasminaCommand) -> str:
        """Why ``command`` cannot run now ("" when it can): a ROLLBACK rewrites weights, a CULL
        or TERMINATE frees a kernel, that a forward's graph may still use (one recorded since
        the last step's end; ``apply_pending`` holds every command then). Executed, the user's
        backward raised, with the command applied. Other commands may run (an optimizer STEP
        between the backward and ``step()``, on the step's gradients)."""
        seed = command.seed if command.kind == "seed" else None
        unsafe = command.kind == "rollback" or (seed is not None and seed.operation in _RELEASING)
        if not unsafe or not self.execution.state.graph_open():
            return ""
        return (
            f"a {command.kind} command executed after a forward that recorded a graph, before "
            "the step's end: that graph may still use the weights or kernel it changes; "
            "execute it after step() (handle_adaptation_command queues it until then)"
        )

    def verify_auth(self, message: Any) -> bool:
        """Signature, freshness and nonce of a command (object or bytes), its nonce unused; bytes
        the door would refuse for their size are refused here too."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            if memoryview(message).nbytes > self.handler.max_message_bytes:
                return False
            try:
                message = AdaptationCommand.FromString(bytes(message))
            except Exception:
                return False
        if not isinstance(message, AdaptationCommand):
            return False
        return self.verifier.verify(message, record_nonce=False)[0]
