"""Epoch checkpoints of a kernel manager, and the rollback that puts one back bit for bit.

Why more than ``capture_training_state``: between a checkpoint and a rollback seeds may have
been germinated, culled or fossilized, so the live model and optimizers may no longer have the
checkpoint's *shape*. The snapshot therefore records which artifact each seed held; the rollback
first re-attaches those kernels (fresh copies of the cached originals), rebuilds the optimizer
layout the checkpoint describes (host groups, promoted seeds, seed optimizers), and only then
loads weights, optimizer states and the state table. Anything that fails before the final
writes is undone and the live state is left as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kasmina.isolation.optimizers import HOST_ID, IsolatedOptimizerManager
from kasmina.manager.checkpoints import capture_training_state, restore_training_state
from kasmina.manager.guard import IsolationGuard
from kasmina.manager.slots import ISOLATED_STAGES, SlotRegistry
from kasmina.manager.state import ManagerState
from kasmina.urza.kernel import GPUKernel

logger = logging.getLogger(__name__)

__all__ = ["restore_epoch", "snapshot"]


def snapshot(state: ManagerState, epoch: int) -> dict[str, Any]:
    """Model (host and seeds), every optimizer, the state table and the seeds' artifacts."""
    registry = state.require_registry()
    seeds = {
        record.seed_id: {
            "artifact_id": record.artifact_id or "",
            "attached": record.kernel is not None,
            "graft_steps": record.graft_steps,
        }
        for record in registry
    }
    extra = {
        "epoch": epoch,
        "global_step": state.global_step,
        "seeds": seeds,
        "val_metrics": {k: float(v) for k, v in state.val_metrics.items()},
    }
    return capture_training_state(
        {"model": registry.model}, state.optimizers, registry.table.state_tensor, extra
    )


def restore_epoch(state: ManagerState, guard: IsolationGuard, epoch: int) -> None:
    """Put the manager's ``state`` back to the checkpoint of ``epoch``; ``guard`` makes the
    monitors of the restored isolated seeds. Raises, changing nothing, if it cannot: missing
    checkpoint, other seeds, an artifact that no longer loads, bad layout."""
    registry = state.require_registry()
    checkpoint = state.checkpoints.load(epoch)
    extra = checkpoint.get("extra") or {}
    saved_seeds = extra.get("seeds")
    if not isinstance(saved_seeds, dict) or set(saved_seeds) != set(registry.records):
        raise ValueError(f"the checkpoint of epoch {epoch} is not for this model's seeds")
    changes = {}
    for record in registry:
        saved = saved_seeds[record.seed_id]
        want = (saved.get("artifact_id") or None) if saved.get("attached") else None
        have = record.artifact_id if record.kernel is not None else None
        if want != have:
            changes[record.seed_id] = want
    fresh: dict[str, tuple[str, GPUKernel]] = {}
    try:
        for seed_id, artifact_id in changes.items():
            if artifact_id is not None:
                original = state.loader.original(artifact_id)
                fresh[seed_id] = (artifact_id, state.loader.copy(original))
        old = _swap_kernels(registry, changes, fresh)
    except BaseException:
        _release(fresh)
        raise
    try:
        optimizers = _rebuild_optimizers(state, registry, checkpoint.get("optimizers"))
        restore_training_state(
            checkpoint, {"model": registry.model}, optimizers, registry.table.state_tensor
        )
    except BaseException:
        for seed_id in changes:  # undo the swap: the old kernels go back in place
            seed = registry[seed_id].seed
            if seed.kernel is not None:
                seed.detach_kernel()
            if old[seed_id] is not None:
                seed.attach_kernel(old[seed_id], registry[seed_id].artifact_id)
        _release(fresh)
        raise
    registry.table.resync()  # the host mirror follows the restored table
    state.optimizers = optimizers
    state.epoch = int(extra.get("epoch", epoch))
    state.global_step = int(extra.get("global_step", state.global_step))
    state.val_metrics = dict(extra.get("val_metrics", {}))
    _commit(state, guard, registry, changes, fresh, saved_seeds)
    logger.warning("rolled back to epoch %d (%d seed kernels re-attached)", epoch, len(fresh))


def _swap_kernels(
    registry: SlotRegistry,
    changes: dict[str, str | None],
    fresh: dict[str, tuple[str, GPUKernel]],
) -> dict[str, torch.nn.Module | None]:
    old = {}
    for seed_id in changes:
        seed = registry[seed_id].seed
        old[seed_id] = seed.detach_kernel() if seed.kernel is not None else None
    for seed_id, (artifact_id, kernel) in fresh.items():
        registry[seed_id].seed.attach_kernel(kernel, artifact_id)
    return old


def _release(fresh: dict[str, tuple[str, GPUKernel]]) -> None:
    for _, kernel in fresh.values():
        kernel.release_gpu_memory()


def _rebuild_optimizers(
    state: ManagerState, registry: SlotRegistry, saved: Any
) -> IsolatedOptimizerManager:
    """Fresh optimizers with the checkpoint's layout (their state is loaded afterwards)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("optimizers"), dict):
        raise ValueError("the checkpoint holds no optimizer state")
    entries: dict[str, Any] = saved["optimizers"]
    optimizers = state.new_optimizer_manager()
    host = entries.get(HOST_ID)
    if host is not None:
        cls = _optimizer_class(state, host.get("class"))
        optimizers.initialize_host(registry.host_params, optimizer_cls=cls)
        for tag in list(host.get("groups", []))[1:]:  # seeds promoted into the host, in order
            optimizers.create_seed_optimizer(tag, registry.seed_parameters(tag), optimizer_cls=cls)
            optimizers.promote_seed(tag)
    for oid, entry in entries.items():
        if oid != HOST_ID:
            cls = _optimizer_class(state, entry.get("class"))
            optimizers.create_seed_optimizer(oid, registry.seed_parameters(oid), optimizer_cls=cls)
    if state.teacher is not None and state.optimizers.teacher_param_count:
        optimizers.register_teacher_params(state.teacher.teacher_parameters())
    return optimizers


def _optimizer_class(state: ManagerState, name: object) -> type[torch.optim.Optimizer]:
    if name == state.optimizer_cls.__name__:
        return state.optimizer_cls
    cls = getattr(torch.optim, str(name), None)
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer):
        return cls
    raise ValueError(f"the checkpoint's optimizer class {name!r} is unknown here")


def _commit(
    state: ManagerState,
    guard: IsolationGuard,
    registry: SlotRegistry,
    changes: dict[str, str | None],
    fresh: dict[str, tuple[str, GPUKernel]],
    saved_seeds: dict[str, Any],
) -> None:
    """The records follow the restored seeds: kernels, pins, hooks, monitors, step counts."""
    for seed_id in changes:
        record = registry[seed_id]
        replaced = record.clear_kernel()
        if replaced is not None:
            replaced.release_gpu_memory()
        if record.pinned and record.artifact_id is not None:
            state.kernel_cache.unpin(record.artifact_id)
        record.artifact_id, record.pinned = None, False
        if seed_id in fresh:
            artifact_id, kernel = fresh[seed_id]
            record.artifact_id, record.kernel = artifact_id, kernel
            record.pinned = state.loader.pin(artifact_id)
            record.hook = kernel.register_forward_hook(record.capture)
    for record in registry:
        saved = saved_seeds[record.seed_id]
        record.artifact_id = saved.get("artifact_id") or None
        record.graft_steps = int(saved.get("graft_steps", 0))
        if not record.timeline or record.timeline[-1][2] != record.stage.name:
            record.timeline.append((state.epoch, state.global_step, record.stage.name))
        record.last_output = None
        record.seed.probe_result = None
        record.monitor = None
        if record.kernel is not None and record.stage in ISOLATED_STAGES:
            record.monitor = guard.new_monitor(record, registry)
            record.monitor.violation_count = record.seed.isolation_violations
