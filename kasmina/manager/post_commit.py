"""What a transition does once the table applied it, and the completion of what of it failed
(docs/design.md §3, "Commit points").

A transition the table applied is a commit point: the command (or the automatic step) that made
it has happened. Before it, a failure undoes everything (GERMINATE, ROLLBACK); after it nothing
can be undone, yet what follows may still fail (a device allocation, a launch): the seed's kernel
copy released, its optimizer dropped and the cached original unpinned (HARVESTING, TERMINATED),
an ACTIVE seed promoted into the host optimizer, a CULL's COOLDOWN and embargo, a GRAFTING
alpha written, the automatic transitions after an epoch's tick. Such a failure is neither
dropped (the seed would keep a pin, a kernel or its own optimizer for good, or sit in HARVESTING,
which no command leaves) nor made the command's refusal (it was applied, and is reported
applied, the failure in its reason). The effect is kept as a pending completion, one per seed
and kind, and tried again at every safe point (a step's end, an epoch's before its checkpoint,
before each command) until it succeeds. Each is idempotent (it redoes only what is left) and is
dropped once its seed left the stages it applies to, or by a committed ROLLBACK, which sets every
seed's kernel, optimizer and pin itself. The failures are counted (``post_commit_deferred``,
``post_commit_retries_failed``) and logged at a bounded rate. Nothing is pending in a healthy
run: a step pays one truthiness check (``pending``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial

from kasmina.manager.records import SeedRecord
from kasmina.manager.report import ManagerReport
from kasmina.manager.state import ManagerState
from kasmina.stages import SeedStage, StateColumn
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["TransitionEffects"]

S = SeedStage
Effect = Callable[[], object]
# The stages in which a released seed's leftovers (pin, optimizer, kernel copy) are still its
# own to give back; a GERMINATE (from DORMANT) takes new ones.
_RELEASED = frozenset({S.HARVESTING, S.COOLDOWN, S.RECYCLING, S.DORMANT, S.TERMINATED})


@dataclass(slots=True)
class _Pending:
    """One effect that failed after its commit, to try again at the next safe point."""

    effect: Effect
    record: SeedRecord | None
    stages: Collection[SeedStage] | None  # the seed's stages it still applies in (None: any)
    generation: int  # the rollbacks committed when it failed: a later one makes it moot
    what: str


class TransitionEffects:
    """The side effects of every applied transition (``on_transition``, the registry's
    listener), a CULL's completion, and the pending completions of those that failed."""

    def __init__(self, state: ManagerState, report: ManagerReport) -> None:
        self.state = state
        self.report = report
        self.pending: dict[tuple[str, str], _Pending] = {}
        # While a command applies: what of it was left pending (said in its outcome's reason).
        self.noting: list[str] | None = None

    # ------------------------------------------------------------------ running, retrying
    def run(
        self,
        record: SeedRecord | None,
        kind: str,
        effect: Effect,
        stages: Collection[SeedStage] | None = None,
        retry: Effect | None = None,
    ) -> Exception | None:
        """Run ``effect`` now; if it raises an ``Exception``, keep ``retry`` (default: the
        effect itself) pending for the next safe point while the seed is in ``stages``, and
        return the exception (an interrupt propagates)."""
        key = (record.seed_id if record is not None else "", kind)
        try:
            effect()
        except Exception as exc:
            what = f"{kind} of seed {key[0]}" if key[0] else kind
            generation = self.state.counters["rollbacks_committed"]
            self.pending[key] = _Pending(retry or effect, record, stages, generation, what)
            counters = self.state.counters
            counters["post_commit_deferred"] += 1
            n, name = counters["post_commit_deferred"], type(exc).__name__
            logger.log(
                rarely(n, 100), "%s failed after its commit (%s: %s); retried at the next safe "
                "point [%d]", what, name, exc, n, exc_info=n == 1,
            )  # fmt: skip
            if self.noting is not None:
                self.noting.append(f"{what} failed ({name}: {exc}), retried at the next safe point")
            return exc
        self.pending.pop(key, None)  # done now: an older failure of it is moot
        return None

    def complete(self) -> None:
        """A safe point: try each pending completion again (in the order they failed); one
        whose seed left its stages, or from before a committed rollback, is dropped."""
        counters = self.state.counters
        generation = counters["rollbacks_committed"]
        for key, entry in list(self.pending.items()):
            record, stages = entry.record, entry.stages
            if self.pending.get(key) is not entry:
                continue  # replaced by the retry of another
            if entry.generation != generation or (
                record is not None and stages is not None and record.stage not in stages
            ):
                del self.pending[key]
                logger.info("%s: no longer due (the seed moved on, or a rollback)", entry.what)
                continue
            try:
                entry.effect()
            except Exception as exc:
                counters["post_commit_retries_failed"] += 1
                n = counters["post_commit_retries_failed"]
                msg = (
                    "%s failed again after its commit (%s: %s); retried at the next safe point [%d]"
                )
                logger.log(rarely(n, 100), msg, entry.what, type(exc).__name__, exc, n)
                continue
            if self.pending.get(key) is entry:
                del self.pending[key]
            logger.warning("%s completed at a later safe point", entry.what)

    # ------------------------------------------------------------------ transitions
    def on_transition(self, record: SeedRecord, old: SeedStage, new: SeedStage) -> None:
        """The manager's side effects of ``record``'s applied transition ``old -> new``; one
        that fails is kept pending (``run``), never raised: the transition stands."""
        state = self.state
        record.timeline.append((state.epoch, state.global_step, new.name))
        if new == S.GRAFTING:  # step 0 of the schedule, so the first GRAFTING step blends
            config = state.config
            steps, temperature = config.grafting_steps, config.grafting_temperature
            start = partial(record.seed.update_alpha_blending, 0, steps, temperature)
            self.run(record, "alpha", start, {S.GRAFTING}, partial(self.sync_alpha, record))
        elif new == S.ACTIVE:
            # Fossilized: the seed is part of the host now; its parameters join the host
            # optimizer (when there is one; otherwise its own optimizer keeps stepping it), in
            # the param group of its slot's host layer: no new group, so a user's LR scheduler
            # on the host optimizer keeps working.
            registry = state.require_registry()
            self.run(record, "fossilization", partial(registry.fossilize, record), {S.ACTIVE})
            promote = partial(self.promote, record)  # the host optimizer a rollback left
            self.run(record, "promotion", promote, {S.ACTIVE})
        elif new == S.HARVESTING:
            report = dict(record.seed.field_report or {})
            report.update(artifact_id=record.artifact_id, epoch=state.epoch, step=state.global_step)
            self.report.note_field_report(report)
            self.run(record, "release", partial(self.release, record), _RELEASED)
        elif new == S.TERMINATED:
            if old == S.ACTIVE:
                # A fossilized seed's parameters stay in the host optimizer's param group (no
                # gradient any more), or its own (no host optimizer) goes; the original unpinned.
                self.run(record, "release", partial(self._retire, record), {S.TERMINATED})
            else:
                self.run(record, "release", partial(self.release, record), {S.TERMINATED})
        elif new == S.DORMANT:
            self.unpin(record)  # (a pin a failed release still holds: its artifact is forgotten)
            record.artifact_id = None
            record.graft_steps = 0
        elif new == S.QUARANTINE:  # no step's check reads its kept output (graph) any more
            record.last_output, record.input_grad = None, False
            state.telemetry.emit("seed.quarantined", 1.0, labels={"seed_id": record.seed_id})

    def promote(self, record: SeedRecord) -> None:
        """An ACTIVE seed's parameters into the host optimizer (a no-op once they are)."""
        self.state.require_registry().promote_active(self.state.optimizers, [record])

    def sync_alpha(self, record: SeedRecord) -> None:
        """A GRAFTING seed's alpha at its schedule's step, written to the table even where the
        seed holds it already (a write that failed left the two apart)."""
        seed, config = record.seed, self.state.config
        steps, temperature = config.grafting_steps, config.grafting_temperature
        seed.update_alpha_blending(record.graft_steps, steps, temperature)
        seed.state_table.set_alpha(seed.state_index, seed.alpha_value)

    def _retire(self, record: SeedRecord) -> None:
        """TERMINATED from ACTIVE: the original unpinned, the seed's own optimizer (if it never
        joined a host one) gone."""
        self.unpin(record)
        if record.seed_id in self.state.optimizers.seed_ids:
            self.state.optimizers.remove_seed(record.seed_id)

    def finish_cull(self, record: SeedRecord, embargo: int) -> None:
        """A CULL past its commit (the table applied HARVESTING): HARVESTING -> COOLDOWN with
        the embargo, the kernel released first (``on_transition`` has, unless HARVESTING's
        announcement was interrupted or its release failed: releasing again does what is left).
        What fails is completed at the next safe point (``run``); an interrupt propagates."""
        cool = partial(self._cool, record, embargo)
        self.run(record, "COOLDOWN after its CULL", cool, {S.HARVESTING, S.COOLDOWN})

    def _cool(self, record: SeedRecord, embargo: int) -> None:
        if record.stage == S.HARVESTING:
            self.release(record)
            try:
                record.seed.transition_to(S.COOLDOWN)
            finally:  # the embargo holds even if COOLDOWN's announcement is interrupted
                if record.stage == S.COOLDOWN:
                    self._embargo(record, embargo)
        else:
            self._embargo(record, embargo)

    def _embargo(self, record: SeedRecord, embargo: int) -> None:
        table = self.state.require_registry().table
        table.set_column(record.index, StateColumn.EMBARGO_COUNTER, embargo)

    def release(self, record: SeedRecord) -> None:
        """Drop the seed's kernel copy (device memory freed), optimizer and monitor; unpin.
        Idempotent: a retry does what is left (a copy whose memory could not be freed is kept
        pending with its own completion)."""
        record.slot.get_and_clear_kd_losses()  # stored KD graphs may run through this kernel
        if record.seed.kernel is not None:
            record.seed.detach_kernel()
        if record.seed_id in self.state.optimizers.seed_ids:
            self.state.optimizers.remove_seed(record.seed_id)
        self.unpin(record)
        kernel = record.clear_kernel()
        if kernel is not None:
            self.run(record, "kernel memory release", kernel.release_gpu_memory)

    def unpin(self, record: SeedRecord) -> None:
        if record.pinned and record.artifact_id is not None:
            self.state.kernel_cache.unpin(record.artifact_id)
        record.pinned = False
