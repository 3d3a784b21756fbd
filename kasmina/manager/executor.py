"""What each verified command does to the manager's seeds (docs/design.md §3, §5).

``CommandExecution.execute`` is the manager's ``CommandExecutor``: the handler calls it only
after signature, freshness, replay and validation checks passed. Every operation either
completes or leaves the seed as it was: GERMINATE does everything that can fail (fetch, verify,
copy, G1, optimizer, monitor) before the DORMANT -> ISOLATED_INIT transition, and undoes it all
if any step fails. A refused command returns False with its reason logged and kept in
``manager.command_log``; the host never notices.

Side effects of transitions live in ``post_commit.TransitionEffects.on_transition`` (called for
every applied transition, whoever made it): a seed that reaches HARVESTING has its kernel copy
released, the cached original unpinned, its optimizer and monitor dropped and a field report
recorded, whether a CULL command or the seed itself sent it there. What fails after a command's
commit point is completed at the next safe point, and the command is reported applied.

An interrupt (``KeyboardInterrupt``, ``SystemExit``: a ``BaseException`` that is not an
``Exception``) is never swallowed, but it is all-or-nothing too: an operation it lands in undoes
itself (GERMINATE, exactly, stage included) or, past its commit point, completes (CULL) before
the interrupt propagates, and ``apply`` notes the command's outcome first.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

from kasmina.control.commands import MAX_EMBARGO_EPOCHS, KasminaCommand, SeedAction
from kasmina.errors import (
    ArtifactIntegrityError,
    ArtifactNotFoundError,
    CheckpointIntegrityError,
    CheckpointUnavailableError,
    IllegalTransitionError,
    ParameterOverlapError,
    UrzaUnavailableError,
)
from kasmina.isolation.sparse_trial import sparse_gradient_problem
from kasmina.leyline import SeedOperation
from kasmina.manager.evaluation import host_flops_per_element
from kasmina.manager.guard import IsolationGuard
from kasmina.manager.post_commit import TransitionEffects
from kasmina.manager.records import SeedRecord
from kasmina.manager.report import ManagerReport
from kasmina.manager.rollback import fetches_bounded, restore_epoch
from kasmina.manager.state import ManagerState
from kasmina.seeds.charging import contained
from kasmina.seeds.columns import SCALE
from kasmina.seeds.dry_run import dry_run_problem
from kasmina.seeds.gates import GateResult
from kasmina.seeds.side_effects import kept_buffers
from kasmina.stages import (
    GATE_FOR_TRANSITION,
    ISOLATED_STAGES,
    LEGAL_TRANSITIONS,
    NEXT_STAGE,
    SeedStage,
)
from kasmina.urza.kernel import GPUKernel
from kasmina.utils.grad_modes import training_tensors
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.modules import rng_forked
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["CommandExecution", "CommandOutcome", "CommandRefused"]

S = SeedStage
# Failures that refuse one command and leave everything as it was (anything else is a bug and
# propagates to the handler, which logs it with its traceback and counts the command failed).
_REFUSALS = (
    ArtifactIntegrityError, ArtifactNotFoundError, CheckpointIntegrityError,
    CheckpointUnavailableError, FileNotFoundError, IllegalTransitionError, KeyError,
    ParameterOverlapError, UrzaUnavailableError, ValueError,
)  # fmt: skip


class CommandRefused(Exception):
    """A command that cannot be carried out in the seed's current state (nothing changed)."""


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What became of one accepted command once it was applied (or refused, and why)."""

    command_id: str
    kind: str
    target: str
    ok: bool
    reason: str


class CommandExecution:
    """Carries out verified commands on the manager's seeds, kernels and optimizers.

    It receives what it touches: the shared ``state``, the ``guard`` that makes seed monitors,
    and the ``report`` that records commands, gates and field reports."""

    def __init__(self, state: ManagerState, guard: IsolationGuard, report: ManagerReport) -> None:
        self.state = state
        self.guard = guard
        self.report = report
        self.effects = TransitionEffects(state, report)  # transitions' side effects, completed
        self.on_transition = self.effects.on_transition  # the registry's listener

    # ------------------------------------------------------------------ dispatch
    def execute(self, command: KasminaCommand) -> bool:
        """Carry out ``command`` now (``manager.execute``: a safe point, where what failed after
        an earlier commit is completed first, unless a forward's graph is open); whether it
        succeeded (see ``apply``)."""
        self.complete_pending(self.state.graph_open())
        return self.apply(command).ok

    def apply(
        self,
        command: KasminaCommand,
        *,
        original: GPUKernel | None = None,
        fetch_error: BaseException | None = None,
        on_interrupt: Callable[[CommandOutcome], None] | None = None,
    ) -> CommandOutcome:
        """Carry out ``command`` now. A GERMINATE may come with its kernel already fetched
        (``original``) or with the error its fetch ended in (``fetch_error``: refused). What
        failed after an earlier commit is not completed here: its safe point did, once.

        An interrupt propagates once the operation has undone or completed itself; the
        command's outcome is noted and handed to ``on_interrupt`` first, so that the caller can
        report it (see ``_interrupted``). Past its commit point a command is applied: what
        fails after it is completed later (``TransitionEffects``), said in its reason."""
        target = command.seed.seed_id if command.seed is not None else command.kind
        before = self._seed_stage(command)
        self.effects.noting = noting = []
        try:
            with training_tensors():
                problem = self._operation(command, original, fetch_error)
        except (CommandRefused, *_REFUSALS) as exc:
            reason = str(exc) if isinstance(exc, CommandRefused) else f"{type(exc).__name__}: {exc}"
            self.state.counters["commands_refused"] += 1  # each in command_log; logged rarely
            n, msg = self.state.counters["commands_refused"], "command %s (%s) refused: %s [%d]"
            logger.log(rarely(n, 100), msg, command.command_id, target, reason, n)
            self.report.note_command(command, False, reason)
            return CommandOutcome(command.command_id, command.kind, target, False, reason)
        except Exception as exc:
            after = self._seed_stage(command)
            if before is None or after is None or after == before:
                raise  # a bug: the caller logs it with its traceback, the command failed
            # Past its commit point (its seed's stage changed): applied, whatever failed after.
            problem = f"applied, then {type(exc).__name__}: {exc} (see the log)"
            logger.error("command %s (%s): %s", command.command_id, target, problem, exc_info=True)
        except BaseException as exc:
            outcome = self._interrupted(command, target, before, exc)
            if on_interrupt is not None:
                on_interrupt(outcome)
            raise
        finally:
            self.effects.noting = None
        problem = "; ".join(p for p in (problem, *noting) if p)
        try:
            self.report.note_command(command, True, problem)
        except BaseException:  # a Ctrl-C as it is noted (whole, or not begun): noted, reported
            if self.report.noted(command) is None:
                self.report.note_command(command, True, problem)
            if on_interrupt is not None:
                ok = CommandOutcome(command.command_id, command.kind, target, True, problem)
                on_interrupt(ok)
            raise
        return CommandOutcome(command.command_id, command.kind, target, True, problem)

    def _operation(
        self,
        command: KasminaCommand,
        original: GPUKernel | None,
        fetch_error: BaseException | None,
    ) -> str:
        """``apply``'s operation: what it reports of a command applied anyway ("": nothing;
        a rollback whose boundary replay failed says so), or an exception that refuses it."""
        registry, seed = self.state.registry, command.seed if command.kind == "seed" else None
        if fetch_error is not None and seed is not None and registry is not None:
            _ = registry[seed.seed_id]  # KeyError: an unknown seed is the refusal, not its fetch
        if fetch_error is not None:  # named by its first public class (private ones refine)
            name = next(c.__name__ for c in type(fetch_error).__mro__ if c.__name__[0] != "_")
            raise CommandRefused(f"loading its kernel failed: {name}: {fetch_error}")
        if command.kind == "seed" and command.seed is not None:
            self._seed_command(command.seed, command.timeout_s, original)
        elif command.kind == "rollback" and command.rollback is not None:
            back = command.rollback
            log = logger.critical if back.emergency else logger.warning
            log("rollback to epoch %d: %s", back.target_epoch, back.reason or "-")
            with fetches_bounded(command.timeout_s):  # a kernel it must fetch again: bounded
                return restore_epoch(self.state, self.guard, back.target_epoch, self.epoch_boundary)
        elif command.kind == "optimizer" and command.optimizer is not None:
            optimizers, registry = self.state.optimizers, self.state.registry
            applied = optimizers.apply_optimizer_command(command)
            if registry is not None:  # a STEP whose seed optimizer raised: a fault, as in step()
                self.charge_failed_steps()  # past the command's commit: contained
                # ACTIVE before an INITIALIZE_HOST: past the command's commit, completed later
                promote = partial(registry.promote_active, optimizers)
                self.effects.run(None, "promotion of the ACTIVE seeds", promote)
            if not applied:
                why = optimizers.last_refusal
                raise CommandRefused(f"rejected by the optimizer manager: {why}")
        else:
            raise CommandRefused(f"command of kind {command.kind!r} has no payload")
        return ""

    def _seed_stage(self, command: KasminaCommand) -> SeedStage | int | None:
        """What tells whether ``command`` took effect: the stage of the seed it names, or for a
        rollback the count of rollbacks committed (None: neither, or no such seed)."""
        if command.kind == "rollback":
            return self.state.counters["rollbacks_committed"]
        registry = self.state.registry
        if command.seed is None or registry is None:
            return None
        record = registry.records.get(command.seed.seed_id)
        return None if record is None else record.stage

    def _interrupted(
        self, command: KasminaCommand, target: str, before: SeedStage | int | None,
        exc: BaseException,
    ) -> CommandOutcome:  # fmt: skip
        """Note the outcome of a command an interrupt cut short, once its operation has undone
        or completed itself: a seed command took effect exactly when its seed's stage changed
        (a CULL past its commit, completed), a rollback when it committed (the boundary replay
        after it may be cut short, as when it fails); an optimizer command is reported not
        applied, with what its own undo left in the log."""
        after = self._seed_stage(command)
        name = type(exc).__name__
        if isinstance(before, SeedStage) and isinstance(after, SeedStage) and after != before:
            ok, reason = True, f"interrupted by {name}; completed ({before.name} -> {after.name})"
        elif before is not None and after is not None and after != before:  # a rollback
            ok, reason = True, f"interrupted by {name} after it committed (see the log)"
        elif before is not None:
            ok, reason = False, f"interrupted by {name}; nothing changed"
        else:
            ok, reason = False, f"interrupted by {name} while it applied (see the log)"
        logger.warning("command %s (%s): %s", command.command_id, target, reason)
        self.report.note_command(command, ok, reason)
        return CommandOutcome(command.command_id, command.kind, target, ok, reason)

    def _seed_command(
        self, action: SeedAction, timeout_s: float, original: GPUKernel | None
    ) -> None:
        record = self.state.require_registry()[action.seed_id]
        op = action.operation
        if op == SeedOperation.SEED_OPERATION_GERMINATE:
            self.germinate(record, action.artifact_id, action.parameters, timeout_s, original)
        elif op == SeedOperation.SEED_OPERATION_ADVANCE:
            self.advance(record, action.parameters)
        elif op == SeedOperation.SEED_OPERATION_CULL:
            self.cull(record, action.parameters)
        elif op == SeedOperation.SEED_OPERATION_TERMINATE:
            self.terminate(record)
        else:
            raise CommandRefused(f"unknown seed operation {op}")

    # ------------------------------------------------------------------ operations
    def germinate(
        self, record: SeedRecord, artifact_id: str, parameters: Mapping[str, float],
        timeout_s: float = math.inf, original: GPUKernel | None = None,
    ) -> None:  # fmt: skip
        """Fetch (or hit the cache, or take ``original``, fetched already), verify, pin, copy,
        dry run, attach, G1, optimizer, monitor, ISOLATED_INIT."""
        state = self.state
        if record.stage != S.DORMANT:
            raise CommandRefused(f"seed {record.seed_id} is {record.stage.name}; needs DORMANT")
        lr = float(parameters.get("learning_rate", state.seed_lr))
        if not 0 < lr < math.inf:  # NaN too; inf: every weight it steps inf
            raise CommandRefused(f"learning_rate must be finite and > 0, got {lr}")
        seed = record.seed
        table, row = seed.state_table, seed.state_index
        # Kept for the undo, before the pin (nothing is taken without an undo): the seed's
        # whole row (on the device: no sync unless needed; attach_kernel writes BLUEPRINT_ID,
        # the seed PERFORMANCE_GATE, the transition the stage, and an interrupt may land after
        # it), the seed's and the record's fields, and the timeline.
        saved_row = table.state_tensor[row].clone()
        saved = (seed.performance_gate, seed.probe_result, record.artifact_id, record.pinned)
        graft_steps, timeline = record.graft_steps, record.timeline
        had_optimizer = record.seed_id in state.optimizers.seed_ids  # the undo keeps one it had
        # Pinned before it is copied, so an eviction cannot release it mid-copy; a kernel the
        # cache does not hold (served uncached) needs no pin, and one evicted before the pin
        # is refused by the copy (docs/design.md §6).
        pinned = False
        if original is None:
            # Executed directly (not queued): its timeout bounds the whole fetch; pinned as loaded.
            deadline = time.monotonic() + timeout_s if math.isfinite(timeout_s) else None
            original, pinned = state.loader.pinned_original(artifact_id, deadline=deadline)
        try:
            self._check_fits_slot(record, original)
            with interrupts_deferred():  # a Ctrl-C between the pin and ``pinned`` leaks it
                pinned = pinned or state.loader.pin(artifact_id, original)
            with state.require_registry().hold.own():  # no model walk for its registrations
                kernel = state.loader.copy(original)
        except BaseException as exc:
            if pinned:
                state.kernel_cache.unpin(artifact_id)
            if isinstance(exc, ValueError):
                raise CommandRefused(f"cannot germinate {artifact_id}: {exc}") from exc
            raise
        try:
            self._dry_run(record, kernel, artifact_id, lr)
            with state.require_registry().hold.own():
                seed.attach_kernel(kernel, artifact_id)
            result = seed.evaluate_gate(S.ISOLATED_INIT)
            self.report.note_gate(record, result)
            if not result.passed:
                raise CommandRefused(f"G1 refused {artifact_id}: {result.reason}")
            state.optimizers.create_seed_optimizer(
                record.seed_id, seed.seed_parameters(), lr=lr, optimizer_cls=state.optimizer_cls,
                **state.optimizer_options,
            )  # fmt: skip
            record.artifact_id, record.kernel, record.pinned = artifact_id, kernel, pinned
            record.hook_kernel(kernel)
            record.monitor = self.guard.new_monitor(record, state.require_registry())
            record.graft_steps = 0
            seed.performance_gate = state.config.performance_gate / SCALE
            seed.transition_to(S.ISOLATED_INIT, gate=1)
            seed.draw_step = 0  # its random kernel's stream, counted by after_step from here
        except BaseException:
            self._undo_germinate(record, kernel, artifact_id, pinned, had_optimizer)
            seed.performance_gate, seed.probe_result, record.artifact_id, record.pinned = saved
            record.graft_steps = graft_steps
            if record.timeline != timeline:  # the transition was announced before the failure
                record.restore_timeline(timeline)
            if record.stage != S.DORMANT:
                # Interrupted after the table applied DORMANT -> ISOLATED_INIT: the row is put
                # back as it was (as a rollback restores stages), and the sinks that heard the
                # transition hear it undone (``cause=undo``; observers are not called).
                msg = "seed %s: GERMINATE interrupted after its transition; it is DORMANT again"
                logger.warning(msg, record.seed_id)
            stages = table.stages()
            table.restore_row(row, saved_row.tolist())  # on failure only: one sync
            table.report_restored(stages, "undo")  # sinks' errors are caught
            raise

    @staticmethod
    def _check_fits_slot(record: SeedRecord, kernel: object) -> None:
        """Refuse an artifact that cannot take the slot's chunk: run on the host's activations,
        it would fault inside the user's forward.

        The slot must have recorded its host output (it has run a forward since attach, or
        since the model was moved or cast) and that output must be chunkable: without it the
        kernel could only be checked against its own manifest. The artifact must declare one
        input of the chunk's rank whose width along the slot's ``chunk_dim`` is the chunk's, in
        the host's dtype (seeds run in the host's dtype: nothing casts between them). The other
        sizes (the batch) are the dry run's to check, on activations of the recorded shape.
        A kernel that writes into its input or a non-persistent buffer is refused first
        (``GPUKernel.seed_hazard``, from the facts read at load)."""
        if hazard := getattr(kernel, "seed_hazard", None):
            raise CommandRefused(f"artifact {hazard}")
        slot = record.slot
        problem = slot.contract_problem()
        if problem is not None:
            raise CommandRefused(f"seed {record.seed_id} cannot take a kernel: {problem}")
        chunk = slot.chunk_spec()
        if chunk is None:
            raise CommandRefused(
                f"seed {record.seed_id}'s slot has recorded no forward since attach (or a move "
                "or cast): its activations' shape is unknown, so the kernel cannot be checked; "
                "send GERMINATE after the first training step or forward (none under torch."
                "autocast records a module without parameters, nor an eval fast path under "
                "no_grad that bypasses it, nn.TransformerEncoderLayer's; unknown after that, the "
                "model never calls it, only reads its weight: attach to the module that calls it)"
            )
        manifest = getattr(kernel, "manifest", None)
        specs = getattr(manifest, "input_spec", ())
        width, dim = record.seed.chunk_size, slot.chunk_dim
        declared = [list(spec.shape) for spec in specs]
        where = f"seed {record.seed_id}'s chunk of width {width} along dim {dim}"
        if len(specs) != 1:
            raise CommandRefused(f"artifact inputs {declared} do not fit {where}")
        spec, rank = specs[0], len(chunk[0])
        if len(spec.shape) != rank:
            raise CommandRefused(
                f"artifact input {declared[0]} does not fit {where}: artifact input rank "
                f"{len(spec.shape)}, the slot's chunk rank {rank} {tuple(chunk[0])} (export "
                f"the kernel on a {rank}-D example input)"
            )
        if spec.shape[dim] not in (None, width):
            raise CommandRefused(f"artifact inputs {declared} do not fit {where}")
        host_dtype = chunk[1]
        if spec.dtype != str(host_dtype).removeprefix("torch."):
            raise CommandRefused(
                f"artifact input dtype {spec.dtype} is not the host's {host_dtype} at {where} "
                "(seeds run in the host's dtype; publish the kernel in it)"
            )

    def _dry_run(self, record: SeedRecord, kernel: GPUKernel, artifact_id: str, lr: float) -> None:
        """Run the seed's new kernel on random activations shaped like the slot's (its recorded
        host output chunk, its dtype and device) at two batch sizes, and its backward once;
        refuse an artifact that raises, answers with another shape or dtype, or is not finite,
        or whose sparse gradients the seed's optimizer (at ``lr``) cannot step. A kernel that
        cannot run on this slot is refused here rather than failing in every host forward or
        step. Buffers it mutates (batch-norm statistics) and the global RNG are put back."""
        # The slot's recorded chunk (``_check_fits_slot`` refused a slot that recorded none).
        state = self.state
        samples = state.require_registry().dry_run_samples(record)
        if not samples:
            raise CommandRefused(f"seed {record.seed_id}: no recorded activations to probe on")
        takes = partial(sparse_gradient_problem, state.optimizer_cls, lr, state.optimizer_options)
        with kept_buffers(kernel), rng_forked(samples[0].device):  # global RNG: as it was
            for i, x in enumerate(samples):  # the backward once, at the recorded batch
                problem = dry_run_problem(kernel, x, backward=i == 0, takes=takes)
                if problem is not None:
                    raise CommandRefused(
                        f"{artifact_id} cannot run on seed {record.seed_id}: on an input "
                        f"{tuple(x.shape)}/{x.dtype} it {problem}"
                    )

    def _undo_germinate(
        self, record: SeedRecord, kernel: object, artifact_id: str, pinned: bool, had: bool
    ) -> None:
        # From the registry, not from how far the steps got (an interrupt may land after the
        # registration); an optimizer the seed had before is not this GERMINATE's to remove.
        if not had and record.seed_id in self.state.optimizers.seed_ids:
            self.state.optimizers.remove_seed(record.seed_id)
        if record.seed.kernel is kernel:
            record.seed.detach_kernel()
        record.clear_kernel()
        record.artifact_id, record.pinned = None, False
        kernel.release_gpu_memory()  # type: ignore[attr-defined]
        if pinned:
            self.state.kernel_cache.unpin(artifact_id)

    def advance(self, record: SeedRecord, parameters: Mapping[str, float]) -> GateResult:
        """Evaluate the gate to the next stage; transition only if it passes.

        A ``gate_score`` in the command is ignored with a warning: G5's evidence is the benefit
        Kasmina measured itself (``manager.evaluate_seeds``), never a number inside the command
        that asks for the fossilization."""
        stage = record.stage
        target = NEXT_STAGE.get(stage)
        if target is None or stage == S.DORMANT:
            what = "GERMINATE it first" if stage == S.DORMANT else "no next stage"
            raise CommandRefused(f"seed {record.seed_id} is {stage.name}: {what}")
        if "gate_score" in parameters:
            self.state.counters["gate_score_ignored"] += 1
            logger.warning(
                "seed %s: ADVANCE's gate_score %s ignored; G5 uses the benefit Kasmina measured "
                "(manager.evaluate_seeds)", record.seed_id, parameters["gate_score"],
            )  # fmt: skip
        result = self.evaluate_gate(record, target)
        self.report.note_gate(record, result)
        if not result.passed:
            raise CommandRefused(f"G{result.gate} refused: {result.reason}")
        record.seed.transition_to(target, gate=result.gate)
        return result

    def evaluate_gate(self, record: SeedRecord, target: SeedStage) -> GateResult:
        """The gate to ``target`` measured with the manager's settings (no transition)."""
        config = self.state.config
        sample = host_cost = None
        gate = GATE_FOR_TRANSITION.get((record.stage, target))
        if gate == 3:
            registry = self.state.require_registry()
            if record.seed.probe_result is None:
                # No forward since COMPATIBILITY_CHECK began: probe activations of the seed's
                # last-seen input shape instead.
                sample = registry.probe_sample(record)
            saved = registry.saved_host_shapes.get(record.slot.layer_id)
            host_cost = host_flops_per_element(record, saved)
        elif gate == 5:  # the live setting G5 applies, in the seed's PERFORMANCE_GATE column too
            self.state.stamp_performance_gate([record])
        return record.seed.evaluate_gate(
            target,
            min_isolated_epochs=config.min_isolated_epochs,
            latency_budget_ms=config.latency_budget_ms,
            performance_gate=config.performance_gate / SCALE,
            max_metric_drop=config.g5_max_metric_drop,
            sample=sample,
            host_flops_per_element=host_cost,
            max_cost_ratio=config.max_seed_cost_ratio,
        )

    def cull(self, record: SeedRecord, parameters: Mapping[str, float]) -> None:
        """-> HARVESTING (kernel released, field report) -> COOLDOWN with the embargo."""
        if S.HARVESTING not in LEGAL_TRANSITIONS[stage := record.stage]:
            raise CommandRefused(f"seed {record.seed_id} cannot be culled from {stage.name}")
        embargo = int(parameters.get("embargo_epochs", self.state.config.default_embargo_epochs))
        if not 0 <= embargo <= MAX_EMBARGO_EPOCHS:  # checked before the seed is touched
            raise CommandRefused(
                f"embargo_epochs must be in 0..{MAX_EMBARGO_EPOCHS}, got {embargo}"
            )
        # All or nothing (docs/design.md §3): the table applying HARVESTING is the commit. From
        # there the kernel is released (device memory freed, optimizer and state dropped), which
        # no undo could give back. So a cull interrupted after the commit (a KeyboardInterrupt
        # from a telemetry sink or an observer, before the release) is completed before the
        # interrupt propagates: the seed leaves in COOLDOWN, as an uninterrupted cull leaves it;
        # one whose release, COOLDOWN or embargo fails (a device error) is applied, and that
        # part completed at the next safe point (``finish_cull``). One refused or interrupted
        # before the commit changed nothing. A real Ctrl-C (a signal) waits for the whole cull.
        # The kernel leaving the model is the manager's own change: no model walk for it.
        with interrupts_deferred(), self.state.require_registry().hold.own():
            try:
                record.seed.transition_to(S.HARVESTING)
            finally:
                if record.stage == S.HARVESTING:
                    self.effects.finish_cull(record, embargo)

    def terminate(self, record: SeedRecord) -> None:
        """-> TERMINATED (final): its release failing is completed later (``on_transition``)."""
        if S.TERMINATED not in LEGAL_TRANSITIONS[stage := record.stage]:
            raise CommandRefused(f"seed {record.seed_id} cannot be terminated from {stage.name}")
        record.seed.transition_to(S.TERMINATED)

    def epoch_boundary(
        self, epoch: int | None = None, metrics: dict[str, float] | None = None
    ) -> list[str]:
        """The end of an epoch: tick the table, then (``epoch`` given: the clock set to it and
        its ``metrics``) G2's count and the automatic transitions (below). Returns the seeds
        recycled. The tick is its commit point: one that raises leaves all as it was (a retry
        does it all); automatic transitions that fail after it are completed at the next safe
        point. ``end_epoch`` runs it after its checkpoint is written, and a rollback to that
        checkpoint runs it again (docs/design.md §6a)."""
        state, registry = self.state, self.state.require_registry()
        state.stamp_performance_gate(registry.in_stages(ISOLATED_STAGES))  # a live change
        registry.table.tick()
        if epoch is not None:  # the automatic steps below happen at this boundary
            state.epoch, state.val_metrics = epoch, metrics if metrics is not None else {}
        registry.count_trained_epochs()  # G2's evidence (stages: the tick changes none)
        recycled: list[str] = []
        with training_tensors():  # a recycled seed's fresh state
            self.effects.run(
                None, "automatic transitions", lambda: recycled.extend(self.auto_transitions())
            )
        return recycled

    def after_step(self, stepped: list[str], trained: list[str], cut: Sequence[str] = ()) -> None:
        """A step's seed bookkeeping once the optimizers stepped, for the seeds it ``trained``
        only (the ``stepped`` that had gradients): an ISOLATED_INIT seed has trained in this epoch
        (G2), a GRAFTING seed's alpha advances one step. A step that trained a seed nothing (no
        backward, a non-finite gradient skipped, a fault that dropped it) moves neither, so G4
        never passes a seed whose blend-in never trained. A seed whose optimizer raised, or whose
        compiled cut zeroed its own non-finite input gradient (``cut``), is charged a fault."""
        config, registry = self.state.config, self.state.require_registry()
        self.charge_failed_steps(cut)
        for seed_id in stepped:  # a random kernel's own stream moves on (``own_stream``)
            seed = registry[seed_id].seed
            seed.draw_step = (seed.draw_step or 0) + 1
        for record in registry.trained(trained):
            seed = record.seed
            if seed.stage == S.ISOLATED_INIT:
                seed.trained_this_epoch = True
            elif seed.stage == S.GRAFTING:
                # Past the host's step (its commit): a write that fails is the seed's fault (found
                # on this rank's device: held for the next step's collective in a multi-rank run,
                # docs/design.md §6a), its alpha written again at the safe point (a completion
                # made only then); the host's step completes.
                record.graft_steps += 1
                steps, temperature = config.grafting_steps, config.grafting_temperature
                try:
                    seed.update_alpha_blending(record.graft_steps, steps, temperature)
                except Exception as exc:
                    resync = partial(self.effects.sync_alpha, record)
                    self.effects.keep(record, "alpha", exc, {S.GRAFTING}, resync)
                    contained(seed, "bookkeeping", f"{type(exc).__name__}: {exc}", found_here=True)
                else:
                    if self.effects.pending:
                        self.effects.settled(record, "alpha")

    def complete_pending(self, graph_open: bool = False) -> None:
        """A safe point's completion of what failed after a commit (``TransitionEffects``); none
        while a forward's graph may be alive (a release drops its slot's KD losses)."""
        if self.effects.pending and not graph_open:
            self.effects.complete()

    def charge_failed_steps(self, cut: Sequence[str] = ()) -> None:
        """The faults the optimizers' last stepping found (``SlotRegistry.charge_failed_steps``),
        past its commit (a host's step, a STEP command): one that raises anyway (a flag's read,
        an ACTIVE seed's TERMINATED the device refused) is counted (``step_charges_failed``) and
        logged at a bounded rate, and what follows completes (the step's zeroing and count)."""
        counters, registry = self.state.counters, self.state.require_registry()
        try:
            registry.charge_failed_steps(self.state.optimizers, cut)
        except Exception as exc:
            counters["step_charges_failed"] += 1
            n, name = counters["step_charges_failed"], type(exc).__name__
            msg = "charging a step's seed faults raised (%s: %s); the step completes [%d]"
            logger.log(rarely(n, 100, logging.ERROR), msg, name, exc, n, exc_info=n == 1)

    def auto_transitions(self) -> list[str]:
        """After a tick: COOLDOWN (embargo over) -> RECYCLING and RECYCLING -> DORMANT."""
        registry = self.state.require_registry()
        updates = []
        for idx in registry.table.get_ready_seeds().tolist():
            stage = registry.table.stage(idx)
            if stage == S.COOLDOWN:
                updates.append((idx, S.RECYCLING))
            elif stage == S.RECYCLING:
                updates.append((idx, S.DORMANT))
        codes = registry.table.batch_state_update(updates)
        return [
            registry.by_index[idx].seed_id
            for (idx, _), code in zip(updates, codes, strict=True)
            if code == 0 and idx in registry.by_index
        ]
