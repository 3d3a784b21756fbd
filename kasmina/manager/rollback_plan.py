"""Phase 1 of a rollback (``rollback.restore_epoch``), the part that only reads and builds
beside the live objects: the checkpoint's fields checked (a signed checkpoint may come from
another version, and the commit only assigns what was checked here) and the optimizers of its
layout rebuilt and loaded. Nothing here writes to a live object, so a failure needs no undo.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from kasmina.isolation.optimizer_state import upgrade_state_dict
from kasmina.isolation.optimizers import HOST_ID, IsolatedOptimizerManager
from kasmina.manager.checkpoints import CHECKPOINT_FORMAT, CheckpointStore
from kasmina.manager.evaluation import parse_host_shapes
from kasmina.manager.slots import HostShapes, SlotRegistry
from kasmina.manager.state import ManagerState
from kasmina.manager.tracked import saved_tracked
from kasmina.manager.training_state import EXTRA_STATE_KEY
from kasmina.seeds.extra_state import parse_seed_state
from kasmina.stages import RUNS_KERNEL, SeedStage, StateColumn, check_saved_stages, checked_row
from kasmina.urza.kernel import GPUKernel

__all__ = ["BOUNDARY_PENDING", "RollbackPlan", "SavedSeed", "read_checkpoint", "rebuild_optimizers"]


# extra["boundary_pending"]: the checkpoint was taken before end_epoch's tick and automatic
# transitions (absent in older checkpoints, which were taken after them).
BOUNDARY_PENDING = "boundary_pending"


class SavedSeed(NamedTuple):
    """A seed's record in a checkpoint (``extra["seeds"]`` of ``rollback.snapshot``), checked."""

    artifact_id: str | None
    attached: bool
    graft_steps: int
    bad_gradients: int = 0  # the run its epoch was in (0: a checkpoint from before it was kept)


class RollbackPlan(NamedTuple):
    """What phase 1 read from the checkpoint, checked: all the later phases write."""

    checkpoint: dict[str, Any]
    saved_seeds: dict[str, SavedSeed]
    pending: bool  # taken before its epoch boundary (replayed after the commit)
    clock: tuple[int, int, dict[str, float]]  # (epoch, global_step, val_metrics)
    saved_shapes: dict[str, HostShapes]
    tracked: dict[str, tuple[Any, Any]]  # name -> (object, saved state)
    unfrozen: list[torch.nn.Parameter] | None  # None: an older checkpoint (the groups decide)
    changes: dict[str, str | None]  # seed_id -> the artifact it will hold (None: no kernel)


def read_checkpoint(
    state: ManagerState,
    registry: SlotRegistry,
    store: CheckpointStore,
    epoch: int,
    boundary: Callable[[], object] | None,
) -> RollbackPlan:
    """Phase 1's start: the checkpoint, verified before it is unpickled, and each field the
    later phases use, checked; which seeds change kernel. Nothing live changes."""
    # On the CPU, as a memory store gives it: the loads below copy each tensor to its live one's
    # device, and a file written on another device (``cuda:1``, a GPU this process lacks) loads.
    checkpoint = store.load(epoch, map_location="cpu")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:  # before any other field is read
        raise ValueError(f"unsupported checkpoint format {checkpoint.get('format')!r}")
    extra = checkpoint.get("extra") or {}
    saved_seeds = _saved_seeds(extra, registry, epoch)
    _check_table(checkpoint, registry, saved_seeds, epoch)
    pending, clock = _saved_clock(extra, epoch, state.global_step)
    saved_shapes = parse_host_shapes(extra.get("host_shapes"), registry)
    own = {state.writer, *state.peer_writers}
    tracked = saved_tracked(extra, state.tracked, epoch, own)  # name -> (object, saved state)
    unfrozen = extra.get("unfrozen")  # absent: an older checkpoint (the groups decide)
    if unfrozen is not None:
        if not isinstance(unfrozen, list) or not all(isinstance(n, str) for n in unfrozen):
            raise ValueError(f"the checkpoint of epoch {epoch}: unfrozen is {unfrozen!r}")
        unfrozen = registry.parameters_named(unfrozen)  # ValueError: names the model lacks
    if pending and boundary is None:
        raise ValueError(f"the checkpoint of epoch {epoch} needs its epoch boundary replayed")
    changes = {}
    for record in registry:
        saved = saved_seeds[record.seed_id]
        want = saved.artifact_id if saved.attached else None
        have = record.artifact_id if record.kernel is not None else None
        if want != have:
            changes[record.seed_id] = want
    return RollbackPlan(
        checkpoint, saved_seeds, pending, clock, saved_shapes, tracked, unfrozen, changes
    )


def _saved_seeds(extra: Any, registry: SlotRegistry, epoch: int) -> dict[str, SavedSeed]:
    """Every seed's record, checked in phase 1 so the commit only assigns (a signed checkpoint
    may come from another version); counts < 2**62: a later step counts on (10**5000 raised)."""
    seeds = extra.get("seeds") if isinstance(extra, Mapping) else None
    if not isinstance(seeds, dict) or set(seeds) != set(registry.records):
        saved = set(map(str, seeds)) if isinstance(seeds, dict) else set()
        absent, lacks = sorted(saved - set(registry.records)), sorted(set(registry.records) - saved)
        raise ValueError(
            f"the checkpoint of epoch {epoch} is not for this model's seeds (its seeds not "
            f"here: {absent[:6]}; seeds here it lacks: {lacks[:6]}): attach the model with the "
            "targets and seeds_per_layer of the run that wrote it"
        )
    parsed = {}
    for seed_id, saved in seeds.items():
        if isinstance(saved, Mapping):
            artifact_id = saved.get("artifact_id") or None
            attached, graft_steps = saved.get("attached", False), saved.get("graft_steps", 0)
            row, bad = saved.get("row"), saved.get("bad_gradients", 0)  # absent: older ones
            typed = isinstance(artifact_id, str | None) and type(attached) is bool
            typed = typed and type(row) in (int, type(None))
            if typed and all(type(n) is int and 0 <= n < 2**62 for n in (graft_steps, bad)):
                parsed[seed_id] = SavedSeed(artifact_id, attached, graft_steps, bad)
                if row in (None, live := registry[seed_id].seed.state_index):  # rows back by row
                    continue
                raise ValueError(  # and kernels by id: each seed would get another's stage
                    f"the checkpoint of epoch {epoch} has seed {seed_id} on state-table row {row}, "
                    f"this model on row {live}: attach the model's slots in the order of the run "
                    "that wrote it (each attach call takes the next rows)"
                )
        raise ValueError(f"the checkpoint of epoch {epoch} holds a malformed record of {seed_id}")
    return parsed


def _check_table(
    checkpoint: Mapping[str, Any],
    registry: SlotRegistry,
    saved_seeds: dict[str, SavedSeed],
    epoch: int,
) -> None:
    """The checkpoint's state table as one instant of this run held it: each row one a restore
    may write (``checked_row``: a known stage, counts >= 0), and each seed's row as its record
    and its own saved state have it. A stage that runs a kernel on a seed whose record attaches
    none would compute the host alone where the table says the seed contributes, and a stage
    other than the one the seed's state was saved in would give the seed another stage's
    optimizer layout and gates. A table of another shape or dtype is left to
    ``restore_training_state``, which names both."""
    table, live = checkpoint.get("state_table"), registry.table.state_tensor
    if not isinstance(table, torch.Tensor) or table.shape != live.shape:
        return
    if table.dtype != live.dtype:
        return
    try:
        rows = [checked_row(row) for row in table.tolist()]
    except ValueError as exc:
        raise ValueError(
            f"the checkpoint of epoch {epoch} holds a state table row: {exc}"
        ) from None
    stages = [SeedStage(row[StateColumn.LIFECYCLE_STAGE]) for row in rows]
    paths = {id(module): name for name, module in registry.model.named_modules()}
    saved_model = (checkpoint.get("modules") or {}).get("model") or {}
    own: dict[str, tuple[int, SeedStage]] = {}  # seed_id -> (its row, its own state's stage)
    for record in registry:
        stage, saved = stages[record.seed.state_index], saved_seeds[record.seed_id]
        if stage in RUNS_KERNEL and not (saved.attached and saved.artifact_id):
            raise ValueError(
                f"the checkpoint of epoch {epoch} has seed {record.seed_id} {stage.name} in its "
                "state table, and its record attaches no kernel"
            )
        value = saved_model.get(f"{paths[id(record.seed)]}.{EXTRA_STATE_KEY}")
        if value is not None:
            own[record.seed_id] = (
                record.seed.state_index,
                parse_seed_state(value, record.seed_id).stage,
            )
    try:
        check_saved_stages(stages, own)
    except ValueError as exc:
        raise ValueError(f"the checkpoint of epoch {epoch}'s {exc}") from None


def _saved_clock(
    extra: Mapping[str, Any], epoch: int, global_step: int
) -> tuple[bool, tuple[int, int, dict[str, float]]]:
    """``(boundary_pending, (epoch, global_step, val_metrics))`` of the checkpoint, checked."""
    pending = extra.get(BOUNDARY_PENDING, False)
    saved_epoch, step = extra.get("epoch", epoch), extra.get("global_step", global_step)
    metrics = extra.get("val_metrics", {})
    if (
        type(pending) is not bool
        or isinstance(saved_epoch, bool)
        or not isinstance(saved_epoch, int)
        # The clock it restores: the file's epoch (signed), or -1 where no epoch had ended (a
        # replica's snapshot, kept as epoch 0); a clock past the file's is no snapshot's.
        or not -1 <= saved_epoch <= epoch
        or type(step) is not int
        or step < 0
        or not isinstance(metrics, Mapping)
        or not all(type(k) in _METRIC_KEYS and type(v) in (float, int) for k, v in metrics.items())
    ):
        raise ValueError(f"the checkpoint of epoch {epoch} holds a malformed clock or metrics")
    return pending, (int(saved_epoch), step, {k: float(v) for k, v in metrics.items()})


# end_epoch saves string keys (report.epoch_metrics); an earlier version saved number keys too.
_METRIC_KEYS = frozenset({str, int, float})


def rebuild_optimizers(
    state: ManagerState,
    registry: SlotRegistry,
    changes: dict[str, str | None],
    fresh: dict[str, tuple[str, GPUKernel]],
    checkpoint: Mapping[str, Any],
) -> IsolatedOptimizerManager:
    """Fresh optimizers with the checkpoint's layout, over the parameters the seeds will hold
    (a changed seed's are its fresh kernel's), loaded with the saved states; the host's groups
    a user added (their parameters found by name in the model) come before the promotions that
    may join them. Built beside the live optimizers: nothing live changes. Each is built with
    the manager's class and constructor options (``fused``, ``foreach``...), as attach and
    GERMINATE build them: the commit moves the state into the live objects, which a user's
    scheduler or ``GradScaler`` holds, so a checkpoint saved from another class is refused
    (``_check_class``)."""
    saved = checkpoint.get("optimizers")
    if not isinstance(saved, dict) or not isinstance(saved.get("optimizers"), dict):
        raise ValueError("the checkpoint holds no optimizer state")
    saved = upgrade_state_dict(saved)
    entries: dict[str, Any] = saved["optimizers"]
    for oid, entry in entries.items():
        _check_class(state, oid, entry.get("class"))

    def params(seed_id: str) -> list[torch.nn.Parameter]:
        if seed_id in changes:
            return list(fresh[seed_id][1].parameters()) if seed_id in fresh else []
        return registry.seed_parameters(seed_id)

    cls, options = state.optimizer_cls, dict(state.optimizer_options)
    optimizers = state.new_optimizer_manager(scratch=True)  # adopted by the live one
    host = entries.get(HOST_ID)
    if host is not None:
        optimizers.initialize_host(registry.host_params, optimizer_cls=cls, **options)
        host_optimizer = optimizers.optimizer(HOST_ID)
        for names in host.get("added_groups", []):  # a user's add_param_group, replayed
            host_optimizer.add_param_group({"params": registry.parameters_named(names)})
        optimizers.take_host_groups(registry.parameter_names)  # their lr etc.: loaded below
        for seed_id, group, _ in host.get("promoted", []):  # seeds promoted, in order
            optimizers.create_seed_optimizer(seed_id, params(seed_id), optimizer_cls=cls, **options)
            optimizers.promote_seed(seed_id, group=int(group))
    for oid in entries:
        if oid != HOST_ID:
            optimizers.create_seed_optimizer(oid, params(oid), optimizer_cls=cls, **options)
    if state.teacher is not None and state.optimizers.teacher_param_count:
        optimizers.register_teacher_params(state.teacher.teacher_parameters())
    optimizers.load_state_dict(saved)
    return optimizers


def _check_class(state: ManagerState, oid: str, name: object) -> None:
    """Refuse a saved optimizer of another class than the manager's ``optimizer_cls`` (a run
    resumed with another ``attach(optimizer_cls=...)``). The host's live object must stay
    (docs/design.md §6a) and cannot take another class's state; a seed's optimizer comes from
    the same setting (GERMINATE builds it), so it is refused alike rather than mixing classes."""
    want = state.optimizer_cls.__name__
    if name != want:
        owner = "host" if oid == HOST_ID else f"seed {oid}'s"
        raise ValueError(
            f"the checkpoint's {owner} optimizer is {name}, this manager's optimizer_cls is "
            f"{want}: a rollback restores into the live optimizers of the manager's class "
            f"(attach with optimizer_cls={name} to resume from it)"
        )
