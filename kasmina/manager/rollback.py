"""Epoch checkpoints of a kernel manager, and the rollback that puts one back bit for bit.

Why more than ``capture_training_state``: between a checkpoint and a rollback seeds may have
been germinated, culled or fossilized, so the live model and optimizers may no longer have the
checkpoint's *shape*. The snapshot therefore records which artifact each seed held. The rollback
is all-or-nothing (docs/design.md §6a), in three phases:

1. nothing live changes: the checkpoint is verified (its signed manifest, size and SHA-256,
   before any byte is unpickled) and loaded, the kernels it names are loaded and copied
   (fresh copies of the cached originals), and the optimizer layout it describes (host groups,
   promoted seeds, seed optimizers) is built beside the live one, of the manager's optimizer
   class (a checkpoint saved with another is refused), and loaded with the saved states (the
   reading and the optimizers in ``rollback_plan``);
2. reversible writes: the kernels are swapped in, then ``restore_training_state`` validates the
   weights against the swapped model (keys and shapes) and writes them and the state table,
   undoing its own writes if one fails, and the host mirror is resynced; the user's tracked
   objects (``manager.track``: a scheduler, a scaler) get the checkpoint's states. Then what
   the commit will hand over is prepared beside the records: the cached originals the restored
   seeds need are pinned and the isolated seeds' monitors built. Any failure unpins what was
   pinned and puts the old kernels (with their probe results), the weights, the table and the
   tracked objects' states back, so the command is refused with nothing changed;
3. the commit, which cannot fail: the rebuilt optimizers' param groups and state move into the
   live optimizer objects (``IsolatedOptimizerManager.adopt``: the host's, and a seed's that
   exists before and after, stays the same object, so a user's LR scheduler or ``GradScaler``
   keeps driving the optimizer that trains), and the counters, records, pins and monitors take
   over (a Ctrl-C is delivered once it is done). Afterwards a seed's original is pinned exactly
   while it holds a kernel and is not TERMINATED (docs/design.md §3), whatever it held before.

Why the epoch boundary is replayed: ``end_epoch`` writes its checkpoint *before* it ticks the
table and runs the automatic COOLDOWN -> RECYCLING -> DORMANT steps, so that a failed write
changes nothing. A checkpoint marked ``boundary_pending`` therefore holds the state just before
that boundary, and the rollback applies the boundary again (the manager's ``boundary``
callback, deterministic) to reach the state ``end_epoch`` left. The replay runs after the commit:
the rollback has happened, so a replay that raises is logged at ERROR and returned as the
problem of an applied command (the state is the checkpoint's, without the boundary or with part
of it), never reported as the refusal of a change that was made.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch

from kasmina.isolation.monitor import GradientIsolationMonitor
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.manager.checkpoints import CheckpointStore, DiskCheckpointStore
from kasmina.manager.evaluation import host_shapes
from kasmina.manager.guard import IsolationGuard
from kasmina.manager.rollback_plan import (
    BOUNDARY_PENDING,
    RollbackPlan,
    SavedSeed,
    read_checkpoint,
    rebuild_optimizers,
)
from kasmina.manager.slots import SlotRegistry
from kasmina.manager.state import ManagerState
from kasmina.manager.tracked import put_back_tracked, tracked_states
from kasmina.manager.training_state import capture_training_state, restore_training_state
from kasmina.seeds.gates import CompatibilityProbe, ProbeFault
from kasmina.seeds.load_hooks import owner_restore
from kasmina.stages import ISOLATED_STAGES, SeedStage
from kasmina.urza.kernel import GPUKernel
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.state_io import clone_state, in_saved_dtypes, unreadable_entry

logger = logging.getLogger(__name__)

__all__ = ["fetches_bounded", "kernels_to_fetch", "restore_epoch", "snapshot"]

# When set, the instant (``time.monotonic``) by which a kernel a rollback puts back must be
# fetched: inside a multi-rank sync, where the other ranks wait in a collective that fails
# every rank at the process group's timeout (``fetches_bounded``).
_FETCH_DEADLINE: ContextVar[float | None] = ContextVar("kasmina_fetch_deadline", default=None)


@contextlib.contextmanager
def fetches_bounded(seconds: float | None) -> Iterator[None]:
    """Inside: a kernel a rollback (or a repair's restore) fetches must arrive within
    ``seconds`` of entering (None, 0 or inf: no bound of its own; an outer one, the earlier,
    stands); one that does not refuses the rollback on this rank, nothing changed, where an
    unbounded fetch could hold every rank past the group's timeout, or a single trainer's step
    for as long as the store's own timeouts and retries allow."""
    deadline = _FETCH_DEADLINE.get()
    if seconds is not None and 0 < seconds < math.inf:
        mine = time.monotonic() + seconds
        deadline = mine if deadline is None else min(deadline, mine)
    token = _FETCH_DEADLINE.set(deadline)
    try:
        yield
    finally:
        _FETCH_DEADLINE.reset(token)


def kernels_to_fetch(state: ManagerState, epoch: int) -> list[str]:
    """The artifacts a ROLLBACK to ``epoch`` would load: each seed's in the checkpoint that
    the seed does not hold now (``CommandQueue`` fetches them ahead of it). What ``snapshot``
    recorded when that checkpoint was taken, else read from it with its tensors on the meta
    device (a restarted run's). None at all inside a bounded multi-rank sync
    (``fetches_bounded``: the application fetches there, within the sync's bound, as every rank
    must apply or refuse alike), nor while no store is open or it keeps no such epoch (the
    application says why). Raises as a load does (a file that does not verify). On the
    applying thread."""
    if _FETCH_DEADLINE.get() is not None or state.closed or state.registry is None:
        return []
    store = state.open_checkpoints()
    if store is None or epoch not in store.epochs():
        return []
    saved = state.saved_kernels.get(epoch)
    if saved is None:
        extra = store.load(epoch, map_location="meta").get("extra") or {}
        seeds = extra.get("seeds") if isinstance(extra, Mapping) else None
        saved = _attached(seeds if isinstance(seeds, Mapping) else {})
    have = {r.seed_id: r.artifact_id for r in state.registry if r.kernel is not None}
    return sorted({a for seed_id, a in saved.items() if have.get(seed_id) != a})


def _attached(seeds: Mapping[str, Any]) -> dict[str, str]:
    """``{seed_id: artifact_id}`` of the seeds a checkpoint's records attach."""
    attached = {}
    for seed_id, record in seeds.items():
        artifact_id = record.get("artifact_id") if isinstance(record, Mapping) else None
        if isinstance(artifact_id, str) and artifact_id and record.get("attached") is True:
            attached[str(seed_id)] = artifact_id
    return attached


_SAVED_KERNELS_SIZE = 64  # epochs whose checkpoints' kernels are remembered (more than kept)


def _note_saved_kernels(state: ManagerState, epoch: int, seeds: Mapping[str, Any]) -> None:
    state.saved_kernels.pop(epoch, None)  # the newest last
    state.saved_kernels[epoch] = _attached(seeds)
    while len(state.saved_kernels) > _SAVED_KERNELS_SIZE:
        del state.saved_kernels[next(iter(state.saved_kernels))]


def restorable(state: ManagerState, epoch: int) -> bool:
    """Whether a checkpoint of the model as it is now could be rolled back to; if not (a
    parameter an optimizer holds is float64: a gradient check of a converted model, whose
    rebuilt optimizers would refuse it, and a model converted back cannot load it; on disk, a
    state ``weights_only`` does not read back, such as a module's extra state holding a NumPy
    array), warned: ``end_epoch`` writes none for ``epoch`` rather than one that fills the
    window in vain (and prunes the checkpoints a rollback could use)."""
    opt = state.optimizers
    if any(p.dtype == torch.float64 for o in opt.optimizer_ids for p in opt.parameters(o)):
        logger.warning(
            "epoch %d: no checkpoint written, the model is in float64 (no rollback could "
            "restore it); convert it back before the next epoch boundary", epoch,
        )  # fmt: skip
        return False
    if not isinstance(state.open_checkpoints(), DiskCheckpointStore):  # kept unpickled
        return True
    model = state.require_registry().model.state_dict()
    problem = unreadable_entry(model) or unreadable_entry({"optimizers": opt.state_dict()})
    if problem is None:
        return True
    logger.warning(
        "epoch %d: no checkpoint written, the model's state holds what a checkpoint cannot "
        "be read back with (%s); make that module's get_extra_state return tensors, "
        "numbers, strings and lists or dicts of them", epoch, problem,
    )  # fmt: skip
    return False


def snapshot(
    state: ManagerState,
    epoch: int,
    val_metrics: Mapping[str, float] | None = None,
    *,
    boundary_pending: bool = False,
) -> dict[str, Any]:
    """Model (host and seeds), every optimizer, the state table and the seeds' artifacts.

    ``val_metrics`` (default: the state's) and ``epoch`` are recorded as given, so a caller can
    snapshot before it changes the state; ``boundary_pending`` marks a snapshot taken before the
    epoch boundary's tick (see the module docstring).
    """
    registry = state.require_registry()
    registry.take_host_groups(state.optimizers)  # one added since the last step
    seeds = {
        record.seed_id: {
            "artifact_id": record.artifact_id or "",
            "attached": record.kernel is not None,
            "graft_steps": record.graft_steps,
            "bad_gradients": record.bad_gradients,  # a run of clipped steps the epoch is in
            "row": record.seed.state_index,  # the table is restored by row
        }
        for record in registry
    }
    if boundary_pending:  # an epoch's checkpoint (end_epoch's): what a ROLLBACK fetches ahead
        _note_saved_kernels(state, epoch, seeds)
    metrics = state.val_metrics if val_metrics is None else val_metrics
    unfrozen = registry.hold.unfrozen()  # frozen when registered, trainable now
    extra = {
        "epoch": epoch,
        "global_step": state.global_step,
        "seeds": seeds,
        "val_metrics": {k: float(v) for k, v in metrics.items()},
        BOUNDARY_PENDING: bool(boundary_pending),
        "host_shapes": host_shapes(registry),  # G3's host cost before a resumed first forward
        "tracked": tracked_states(state.tracked, state.writer),
        "unfrozen": registry.hold.names(unfrozen, limit=None) if unfrozen else [],
    }
    # On the CPU, where every store keeps it: no second copy of the model and its optimizers'
    # states in the device's memory at each checkpoint.
    return capture_training_state(
        {"model": registry.model}, state.optimizers, registry.table.state_tensor, extra, "cpu"
    )


def restore_epoch(
    state: ManagerState,
    guard: IsolationGuard,
    epoch: int,
    boundary: Callable[[], object] | None = None,
) -> str:
    """Put the manager's ``state`` back to the checkpoint of ``epoch``; ``guard`` makes the
    monitors of the restored isolated seeds, ``boundary`` replays the epoch boundary (tick and
    automatic transitions) for a checkpoint taken before it. Raises, changing nothing, if it
    cannot: no checkpoint of that epoch (``CheckpointUnavailableError``, naming the nearest), a
    file that does not verify (``CheckpointIntegrityError``), other seeds, an artifact that no
    longer loads, bad layout. Returns "" once rolled back, or the problem of a boundary replay
    that failed after the commit (see the module docstring)."""
    registry = state.require_registry()
    store = state.checkpoints  # opened now: the commit below reads no property that can raise
    # Phase 1: verify, load and validate everything; nothing live changes.
    plan = read_checkpoint(state, registry, store, epoch, boundary)
    loaded = _load_beside(state, registry, plan)
    # Phase 2: reversible writes, each undone (the backup put back) if a later one fails.
    backup = _Backup.take(registry)
    hold = interrupts_deferred()  # phase 3's, taken where a Ctrl-C still undoes phase 2
    handover = _write_reversibly(state, guard, registry, plan, loaded, backup, hold)
    # Phase 3: the commit (nothing here can fail; a Ctrl-C is held until it is done).
    try:
        _commit_rollback(state, registry, store, epoch, plan, loaded, handover, backup.stages)
    finally:
        hold.__exit__(None, None, None)  # entered at phase 2's end
    logger.warning(
        "rolled back to epoch %d (%d seed kernels re-attached)", epoch, len(loaded.fresh)
    )
    if not plan.pending or boundary is None:
        return ""
    return _replay_boundary(epoch, boundary)


class _Loaded(NamedTuple):
    """What phase 1 built beside the live objects."""

    tracked_before: dict[str, Any]  # the tracked objects' live states, for phase 2's undo
    fresh: dict[str, tuple[str, GPUKernel]]  # seed_id -> (artifact_id, its fresh kernel)
    optimizers: IsolatedOptimizerManager  # the checkpoint's layout, loaded


def _load_beside(state: ManagerState, registry: SlotRegistry, plan: RollbackPlan) -> _Loaded:
    """Phase 1's end: the kernels the changed seeds will hold (fresh copies of the cached
    originals) and the rebuilt optimizers; nothing live changes, and on a failure the copies
    made are released."""
    fresh: dict[str, tuple[str, GPUKernel]] = {}
    try:
        tracked_before = {
            name: copy.deepcopy(obj.state_dict()) for name, (obj, _) in plan.tracked.items()
        }
        paths = {id(m): name for name, m in registry.model.named_modules()}
        saved_model = (plan.checkpoint.get("modules") or {}).get("model") or {}
        for seed_id, artifact_id in plan.changes.items():
            if artifact_id is not None:
                deadline = _FETCH_DEADLINE.get()  # pinned as loaded: no eviction mid-copy
                original, pinned = state.loader.pinned_original(artifact_id, deadline=deadline)
                try:
                    fresh[seed_id] = (artifact_id, kernel := state.loader.copy(original))
                finally:  # the restored seed takes a pin of its own in phase 2
                    if pinned:
                        state.kernel_cache.unpin(artifact_id)
                # In the dtypes the checkpoint holds it in (a model converted after it grew).
                at = f"{paths[id(registry[seed_id].seed)]}.kernel."
                in_saved_dtypes(
                    kernel, {k[len(at) :]: v for k, v in saved_model.items() if k[: len(at)] == at}
                )
        optimizers = rebuild_optimizers(state, registry, plan.changes, fresh, plan.checkpoint)
    except BaseException:
        _release(fresh)
        raise
    return _Loaded(tracked_before, fresh, optimizers)


class _Backup(NamedTuple):
    """What phase 2's undo puts back. The model's state is backed up before the kernels are
    swapped: restore_training_state's own undo runs with the checkpoint's kernels in place,
    and a seed's state cannot go back into a seed whose kernel is swapped out, so the undo
    that counts is this one, after the old kernels are back."""

    table: dict[str, Any]
    stages: list[SeedStage]  # for the commit's report too
    model: dict[str, Any]
    old: dict[str, _Detached]  # filled by _swap_kernels
    taken: list[str]  # pins taken for the restored seeds, dropped again by the undo
    # A seed's state restore drops its evaluation (measured on other weights): the undo
    # loads the old state back, so it puts the evaluations back too.
    evaluations: list[tuple[Any, Any]]  # (seed, its evaluation)
    added_host_params: dict[int, torch.nn.Parameter]

    @classmethod
    def take(cls, registry: SlotRegistry) -> _Backup:
        return cls(
            registry.table.state_dict(),
            registry.table.stages(),
            # On the CPU: no second copy on the device (a buffer on meta has no data to copy).
            clone_state(registry.model.state_dict(), "cpu", keep_meta=True),
            {},
            [],
            [(record.seed, record.seed.evaluation) for record in registry],
            registry.added_host_params,
        )


class _Handover(NamedTuple):
    """What phase 2 prepared beside the records, for the commit to hand over."""

    pins: dict[str, tuple[bool, str | None]]
    monitors: dict[str, GradientIsolationMonitor]


def _write_reversibly(
    state: ManagerState,
    guard: IsolationGuard,
    registry: SlotRegistry,
    plan: RollbackPlan,
    loaded: _Loaded,
    backup: _Backup,
    hold: interrupts_deferred,
) -> _Handover:
    """Phase 2: swap the kernels, restore the weights, the table and the tracked objects'
    states, take the pins and build the monitors; ends by entering ``hold`` (phase 3's). Any
    failure (a Ctrl-C included) puts ``backup`` back, releases the fresh kernels and raises."""
    try:
        _swap_kernels(registry, plan.changes, loaded.fresh, backup.old)
        with owner_restore():  # the seeds' stages may change: this restore brings the rest
            restore_training_state(  # the table's rows: checked in phase 1 (read_checkpoint)
                plan.checkpoint,
                {"model": registry.model},
                None,
                registry.table.state_tensor,
                rows_checked=True,
            )
        registry.table.resync()  # the host mirror follows the restored table (stages below)
        for obj, saved in plan.tracked.values():  # the user's scheduler, scaler...: the epoch's
            obj.load_state_dict(copy.deepcopy(saved))
        pins = _take_pins(state, registry, plan.saved_seeds, backup.taken)
        if loaded.optimizers.has_host:  # the monitors guard the restored host groups too
            registry.added_host_params = registry.host_groups_of(loaded.optimizers)
        monitors = _new_monitors(guard, registry)
        hold.__enter__()  # from here a SIGINT waits for the commit's end
    except BaseException:
        registry.added_host_params = backup.added_host_params
        for artifact_id in backup.taken:
            state.kernel_cache.unpin(artifact_id)
        _unswap_kernels(registry, backup.old)
        registry.table.load_state_dict(backup.table)  # blueprint columns, mirror included
        with owner_restore():
            registry.model.load_state_dict(backup.model)
        for seed, evaluation in backup.evaluations:
            seed.evaluation = evaluation
        _release(loaded.fresh)
        put_back_tracked(plan.tracked, loaded.tracked_before)
        hold.__exit__(None, None, None)  # (never entered: nothing follows its entry above)
        raise
    return _Handover(pins, monitors)


def _commit_rollback(
    state: ManagerState,
    registry: SlotRegistry,
    store: CheckpointStore,
    epoch: int,
    plan: RollbackPlan,
    loaded: _Loaded,
    handover: _Handover,
    stages_before: list[SeedStage],
) -> None:
    """Phase 3, the commit: nothing here can fail (run under the hold phase 2 entered)."""
    state.counters["rollbacks_committed"] += 1
    state.optimizers.adopt(loaded.optimizers)  # the live optimizer objects stay (dict moves only)
    registry.take_host_groups(state.optimizers, rebuilt=True, unfrozen=plan.unfrozen)
    state.epoch, state.global_step, state.val_metrics = plan.clock
    registry.saved_host_shapes = plan.saved_shapes
    store.abandon_after(epoch)  # the next save may drop the later epochs
    pins, monitors = handover
    _commit_records(state, registry, plan.changes, loaded.fresh, plan.saved_seeds, pins, monitors)
    # Gradients computed on the abandoned timeline's weights: the checkpoint holds none.
    registry.model.zero_grad(set_to_none=True)
    registry.table.report_restored(stages_before, "rollback")  # sinks' errors are caught


def _replay_boundary(epoch: int, boundary: Callable[[], object]) -> str:
    """After the commit: the epoch boundary a ``boundary_pending`` checkpoint was taken before,
    applied again; "" or, if it raised, the problem of the applied rollback (logged at ERROR)."""
    try:
        with interrupts_deferred():  # whole, as ``end_epoch`` runs it
            boundary()
    except Exception as exc:
        problem = (
            f"rolled back to epoch {epoch}, but replaying its epoch boundary failed "
            f"({type(exc).__name__}: {exc}); the state is the checkpoint's without that "
            "boundary, or with part of it"
        )
        logger.error("%s", problem, exc_info=True)
        return problem
    return ""


# A changed seed's kernel as ``_swap_kernels`` detached it, with the probe result the detach
# cleared (COMPATIBILITY_CHECK's evidence for G3), for the undo.
_Detached = tuple[torch.nn.Module | None, CompatibilityProbe | ProbeFault | None]


def _swap_kernels(
    registry: SlotRegistry,
    changes: dict[str, str | None],
    fresh: dict[str, tuple[str, GPUKernel]],
    old: dict[str, _Detached],
) -> None:
    """Detach the changed seeds' kernels (into ``old``, so a failure can be undone at any
    point) and attach the fresh ones."""
    for seed_id in changes:
        seed = registry[seed_id].seed
        old[seed_id] = (seed.kernel, seed.probe_result)  # first: a detach cut short is undone too
        if seed.kernel is not None:
            seed.detach_kernel()
    for seed_id, (artifact_id, kernel) in fresh.items():
        registry[seed_id].seed.attach_kernel(kernel, artifact_id)


def _unswap_kernels(registry: SlotRegistry, old: dict[str, _Detached]) -> None:
    """Put back the kernels (and probe results) ``_swap_kernels`` took (the table is restored
    by the caller)."""
    for seed_id, (kernel, probe) in old.items():
        seed = registry[seed_id].seed
        if seed.kernel is not None:
            seed.detach_kernel()
        if kernel is not None:
            seed.attach_kernel(kernel, registry[seed_id].artifact_id)
        seed.probe_result = probe


def _take_pins(
    state: ManagerState,
    registry: SlotRegistry,
    saved_seeds: dict[str, SavedSeed],
    taken: list[str],
) -> dict[str, tuple[bool, str | None]]:
    """Each restored seed's pin (run with the checkpoint's kernels and stages in place): its
    cached original is pinned while it holds a kernel and is not TERMINATED (an original the
    cache does not hold needs none). The pins it needs and lacks are taken now, into ``taken``
    for the undo; returns ``{seed_id: (pinned, release)}``, ``release`` being the artifact whose
    pin the commit drops (None: none)."""
    plan: dict[str, tuple[bool, str | None]] = {}
    for record in registry:
        artifact_id = saved_seeds[record.seed_id].artifact_id
        live = record.seed.kernel is not None and record.stage != SeedStage.TERMINATED
        held = record.artifact_id if record.pinned else None
        if live and artifact_id is not None and held == artifact_id:
            plan[record.seed_id] = (True, None)  # its pin stays
            continue
        pinned = live and artifact_id is not None and state.loader.pin(artifact_id)
        if pinned:
            taken.append(artifact_id)
        plan[record.seed_id] = (pinned, held)
    return plan


def _new_monitors(
    guard: IsolationGuard, registry: SlotRegistry
) -> dict[str, GradientIsolationMonitor]:
    """The monitors of the restored isolated seeds, with their restored violation counts."""
    monitors = {}
    for record in registry:
        if record.seed.kernel is not None and record.stage in ISOLATED_STAGES:
            monitor = guard.new_monitor(record, registry)
            monitor.violation_count = record.seed.isolation_violations
            monitors[record.seed_id] = monitor
    return monitors


def _release(fresh: dict[str, tuple[str, GPUKernel]]) -> None:
    for _, kernel in fresh.values():
        kernel.release_gpu_memory()


def _commit_records(
    state: ManagerState,
    registry: SlotRegistry,
    changes: dict[str, str | None],
    fresh: dict[str, tuple[str, GPUKernel]],
    saved_seeds: dict[str, SavedSeed],
    pins: dict[str, tuple[bool, str | None]],
    monitors: dict[str, GradientIsolationMonitor],
) -> None:
    """The records follow the restored seeds: kernels, hooks, pins, monitors, step counts."""
    for seed_id in changes:
        record = registry[seed_id]
        replaced = record.clear_kernel()
        if replaced is not None:
            replaced.release_gpu_memory()
        if seed_id in fresh:
            record.kernel = fresh[seed_id][1]
            record.hook_kernel(record.kernel)
    released = []
    for record in registry:
        saved = saved_seeds[record.seed_id]
        record.pinned, release = pins[record.seed_id]
        if release is not None:
            released.append(release)
        record.artifact_id = saved.artifact_id
        record.graft_steps, record.bad_gradients = saved.graft_steps, saved.bad_gradients
        timeline = record.timeline
        if not timeline or timeline[-1][2] != record.stage.name:
            record.note_stage(state.epoch, state.global_step, record.stage)
        record.last_output, record.input_grad = None, False
        record.seed.probe_result = None
        record.monitor = monitors.get(record.seed_id)
    for artifact_id in released:  # each was pinned on a record's behalf: the count is > 0
        state.kernel_cache.unpin(artifact_id)
