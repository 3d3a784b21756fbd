"""What a transition does once the table applied it, and the completion of what of it failed
(docs/design.md §3, "Commit points").

A transition the table applied is a commit point: the command (or the automatic step) that made
it has happened. Before it, a failure undoes everything (GERMINATE, ROLLBACK); after it nothing
can be undone, yet what follows may still fail (a device allocation, a launch): the seed's kernel
copy released, its optimizer dropped and the cached original unpinned (HARVESTING, TERMINATED),
an ACTIVE seed promoted into the host optimizer, a CULL's COOLDOWN and embargo, a GRAFTING
alpha written, the automatic transitions after an epoch's tick, the seed's own writes for its new
stage (its alpha, scores and flags: ``seeds.stage_entry``). Such a failure is neither
dropped (the seed would keep a pin, a kernel or its own optimizer for good, or sit in HARVESTING,
which no command leaves) nor made the command's refusal (it was applied, and is reported
applied, the failure in its reason). The effect is kept as a pending completion, one per seed
and kind (a kernel's memory release: one per kernel), and tried again at the safe points: a
step's end, an epoch's before its checkpoint, a direct ``execute`` outside a forward's graph;
never while one applies its commands, so at most once a step. The first retry is at the next
safe point; each that fails puts the next one off (1, 2, 4, ... steps), and after
``MAX_RETRIES`` the completion is given up: counted (``post_commit_abandoned``), logged once at
ERROR, and a seed that runs a kernel is charged a fault (``bookkeeping``; QUARANTINE at its
limit, docs/design.md §6a). Each is idempotent (it redoes only what is left) and is dropped once
its seed left the stages it applies to, by a committed ROLLBACK, which sets every seed's kernel,
optimizer and pin itself, or when the manager closes (after a last try: ``close``). The
failures are counted (``post_commit_deferred``, ``post_commit_retries_failed``) and logged at a
bounded rate. Nothing is pending in a healthy run: a step pays one truthiness check
(``pending``); a GRAFTING seed's alpha is written directly, a completion made only if it fails
(``keep``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial

from kasmina.manager.records import SeedRecord
from kasmina.manager.report import ManagerReport
from kasmina.manager.state import ManagerState
from kasmina.seeds.charging import contained
from kasmina.stages import RELEASED_STAGES, RUNS_KERNEL, SeedStage, StateColumn
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = ["TransitionEffects"]

S = SeedStage
Effect = Callable[[], object]
Key = tuple[str, str, int]  # (seed id or "", kind, the id of the object it completes, or 0)
# Failed retries after which a completion is given up (the retries are 1, 2, 4, ... steps apart).
MAX_RETRIES = 8


@dataclass(slots=True)
class _Pending:
    """One effect that failed after its commit, to try again at the next safe point."""

    effect: Effect
    record: SeedRecord | None
    stages: Collection[SeedStage] | None  # the seed's stages it still applies in (None: any)
    generation: int  # the rollbacks committed when it failed: a later one makes it moot
    what: str
    retries: int = 0  # the retries of it that failed
    due: int = -1  # the global step from which it is tried again (-1: the next safe point)


class TransitionEffects:
    """The side effects of every applied transition (``on_transition``, the registry's
    listener), a CULL's completion, and the pending completions of those that failed."""

    def __init__(self, state: ManagerState, report: ManagerReport) -> None:
        self.state = state
        self.report = report
        self.pending: dict[Key, _Pending] = {}
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
        of: object = None,
    ) -> Exception | None:
        """Run ``effect`` now; if it raises an ``Exception``, keep ``retry`` (default: the
        effect itself) pending for the next safe point while the seed is in ``stages``, and
        return the exception (an interrupt propagates). ``of``: the object it completes (a
        kernel), each of which has its own completion (None: one per seed and kind)."""
        try:
            effect()
        except Exception as exc:
            self.keep(record, kind, exc, stages, retry or effect, of)
            return exc
        if self.pending:  # done now: an older failure of it is moot
            self.pending.pop(self._key(record, kind, of), None)
        return None

    def keep(
        self,
        record: SeedRecord | None,
        kind: str,
        exc: Exception,
        stages: Collection[SeedStage] | None,
        retry: Effect,
        of: object = None,
    ) -> None:
        """``run``'s failure ``exc``, for a caller that ran the effect itself: ``retry`` is kept
        pending. One that failed before and is still pending keeps its retries' count and
        schedule (a failure of it made again does not start them over)."""
        key = self._key(record, kind, of)
        what = f"{kind} of seed {key[0]}" if key[0] else kind
        generation = self.state.counters["rollbacks_committed"]
        entry = _Pending(retry, record, stages, generation, what)
        if (older := self.pending.get(key)) is not None and older.generation == generation:
            entry.retries, entry.due = older.retries, older.due
        self.pending[key] = entry
        counters = self.state.counters
        counters["post_commit_deferred"] += 1
        n, name = counters["post_commit_deferred"], type(exc).__name__
        logger.log(
            rarely(n, 100), "%s failed after its commit (%s: %s); retried at a later safe "
            "point [%d]", what, name, exc, n, exc_info=n == 1,
        )  # fmt: skip
        if self.noting is not None:
            self.noting.append(f"{what} failed ({name}: {exc}), retried at the next safe point")

    def settled(self, record: SeedRecord, kind: str) -> None:
        """``record``'s ``kind`` just succeeded without ``run``: a pending failure of it is moot."""
        self.pending.pop(self._key(record, kind, None), None)

    @staticmethod
    def _key(record: SeedRecord | None, kind: str, of: object) -> Key:
        # ``of`` is alive while its entry is (its effect holds it): its id names it.
        return (record.seed_id if record is not None else "", kind, 0 if of is None else id(of))

    def complete(self, last: bool = False) -> None:
        """A safe point: try each pending completion that is due again (in the order they
        failed); one whose seed left its stages, or from before a committed rollback, is
        dropped; one that failed ``MAX_RETRIES`` retries is given up (``_abandon``). ``last``:
        the manager's close, where each is tried once more, due or not, and none given up."""
        counters, step = self.state.counters, self.state.global_step
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
            if entry.due > step and not last:
                continue  # put off after its last failed retry
            try:
                entry.effect()
            except Exception as exc:
                counters["post_commit_retries_failed"] += 1
                entry.retries += 1
                if entry.retries >= MAX_RETRIES and not last:
                    if self.pending.get(key) is entry:
                        del self.pending[key]
                    self._abandon(entry, exc)
                    continue
                entry.due = step + 2 ** (entry.retries - 1)
                n = counters["post_commit_retries_failed"]
                msg = "%s failed again after its commit (%s: %s); retried from step %d [%d]"
                logger.log(rarely(n, 100), msg, entry.what, type(exc).__name__, exc, entry.due, n)
                continue
            if self.pending.get(key) is entry:
                del self.pending[key]
            logger.warning("%s completed at a later safe point", entry.what)

    def _abandon(self, entry: _Pending, exc: Exception) -> None:
        """Give ``entry`` up after ``MAX_RETRIES`` failed retries: counted, logged at ERROR, and a
        fault of its seed's where it is due in a stage that runs the seed's kernel (an alpha, a
        promotion: QUARANTINE at its limit, design §6a; in a multi-rank run charged at the next
        step, on every rank, ``record_fault``). A kernel's memory release is due in any stage,
        the seed maybe running another kernel since: that one is not charged."""
        self.state.counters["post_commit_abandoned"] += 1
        reason = f"{entry.what} failed {entry.retries + 1} times after its commit, last: "
        reason += f"{type(exc).__name__}: {exc}"
        logger.error("%s; given up, never completed", reason)
        record = entry.record
        if record is not None and entry.stages is not None and record.stage in RUNS_KERNEL:
            contained(record.seed, "bookkeeping", reason, found_here=True)

    def close(self, graph_open: bool) -> None:
        """The manager closes: each pending completion is tried a last time (not while a
        forward's graph may be alive), and what is still pending is dropped, logged."""
        if self.pending and not graph_open:
            self.complete(last=True)
        if self.pending:
            for entry in self.pending.values():
                logger.warning("%s: still pending as the manager closed; dropped", entry.what)
            self.state.counters["post_commit_dropped"] += len(self.pending)
            self.pending.clear()

    # ------------------------------------------------------------------ transitions
    def on_transition(self, record: SeedRecord, old: SeedStage, new: SeedStage) -> None:
        """The manager's side effects of ``record``'s applied transition ``old -> new``; one
        that fails is kept pending (``run``), never raised: the transition stands."""
        state = self.state
        record.note_stage(state.epoch, state.global_step, new)
        if record.seed.unsettled == new:  # its own writes for ``new`` failed (``stage_entry``;
            # the seed hears of its row first: it observed it from its construction, before any
            # manager registered it): tried again now, else at the next safe point
            settle = record.seed.settle_stage
            self.run(record, f"entry into {new.name}", settle, {new})
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
            # A released seed's leftovers (pin, optimizer, kernel copy) are still its own to
            # give back in these stages; a GERMINATE (from DORMANT) takes new ones.
            self.run(record, "release", partial(self.release, record), RELEASED_STAGES)
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
        if kernel is not None:  # this kernel's own completion (the seed may take another)
            self.run(record, "kernel memory release", kernel.release_gpu_memory, of=kernel)

    def unpin(self, record: SeedRecord) -> None:
        if record.pinned and record.artifact_id is not None:
            self.state.kernel_cache.unpin(record.artifact_id)
        record.pinned = False
