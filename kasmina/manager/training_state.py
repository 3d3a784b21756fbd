"""What a checkpoint holds, captured and restored (the pair behind a rollback and a repair).

A ``RollbackCommand`` must put seeds' weights, the lifecycle state table and every optimizer's
state back bit for bit. ``capture_training_state`` snapshots them (cloned, so later training
cannot mutate the snapshot) and ``restore_training_state`` validates everything before it
changes anything, so a bad checkpoint is rejected with the live state intact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kasmina.manager.checkpoints import CHECKPOINT_FORMAT
from kasmina.seeds.load_hooks import check_seed_states
from kasmina.stages import checked_row
from kasmina.utils.state_io import clone_state, load_mismatch

if TYPE_CHECKING:
    from kasmina.isolation.optimizers import IsolatedOptimizerManager

logger = logging.getLogger(__name__)

__all__ = ["capture_training_state", "restore_training_state"]

# The state_dict key suffix of a module's get_extra_state() value (PyTorch's name for it).
EXTRA_STATE_KEY = "_extra_state"


def capture_training_state(
    modules: Mapping[str, nn.Module],
    optimizers: IsolatedOptimizerManager | None = None,
    state_table: torch.Tensor | None = None,
    extra: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Snapshot module weights, optimizer states and the state table (all cloned; onto
    ``device`` when given, each tensor copied there straight from its own).

    The result holds only tensors and plain containers, so it can be saved with
    a ``CheckpointStore`` and loaded back with ``weights_only=True``. An epoch checkpoint is
    taken with ``device="cpu"``: a clone on the model's GPU first would hold a second copy of
    the weights and every optimizer state there, and a model using half the GPU ran out of
    memory at its epoch boundary.
    """
    saved = optimizers.state_dict() if optimizers is not None else None
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "modules": {
            name: clone_state(module.state_dict(), device, keep_meta=True)
            for name, module in modules.items()
        },
        "optimizers": clone_state(saved, device, keep_meta=True),  # None stays None
        "state_table": clone_state(state_table, device),
    }
    if extra is not None:
        state["extra"] = clone_state(dict(extra), device, keep_meta=True)
    return state


def _validate_module_state(name: str, module: nn.Module, saved: Mapping[str, Any]) -> None:
    live = module.state_dict()
    missing = sorted(set(live) - set(saved))
    unexpected = sorted(set(saved) - set(live))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint for module {name!r} does not match: missing {missing}, "
            f"unexpected {unexpected}"
        )
    for key, tensor in live.items():
        if key.rpartition(".")[2] == EXTRA_STATE_KEY:
            continue  # a module's extra state is a value (its length varies), not a weight
        kept = saved[key]  # taken on meta (no data), it cannot be written over data
        if isinstance(kept, torch.Tensor) and kept.is_meta and not tensor.is_meta:
            raise ValueError(
                f"checkpoint for {name}.{key} holds no data (it was on meta when taken); the "
                "live one has data: fill it before the checkpoint, or roll back to a later one"
            )
        problem = load_mismatch(module, key, tensor, saved)
        if problem is not None and problem[0] == "shape":
            raise ValueError(
                f"checkpoint for {name}.{key} has shape {problem[1]}, expected "
                f"{tuple(tensor.shape)}"
            )
        if problem is not None:
            # A load would cast it silently, and the seeds' kernels (the artifacts' dtype)
            # would then fault at every call: build the model as the run was, as kasmina.load
            # asks too.
            raise ValueError(
                f"checkpoint for {name}.{key} is {problem[1]}, the live model's "
                f"{tensor.dtype}: build the model in the checkpoint's dtype, then roll back"
            )


def restore_training_state(
    state: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    optimizers: IsolatedOptimizerManager | None = None,
    state_table: torch.Tensor | None = None,
    *,
    rows_checked: bool = False,
) -> None:
    """Put back what ``capture_training_state`` took, bit for bit.

    Everything is validated first (module keys and shapes, the seeds' states as their load
    would check them, optimizer layout, state-table shape, dtype and rows: known stages, counts
    >= 0; ``rows_checked``: the caller checked each row of a table of this shape and dtype with
    ``checked_row`` already, as a rollback's phase 1 does, so they are not read twice); only
    then is anything written, so a mismatched checkpoint raises ``ValueError``
    and leaves the live state untouched. A write that fails anyway is undone from a backup
    taken just before the writes, so the live state is never left half restored. The state
    table is copied in place so references held elsewhere (e.g. by the lifecycle's state
    tensor) stay valid; whoever keeps a host mirror of the stages must refresh it afterwards.
    """
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
    saved_modules = state.get("modules") or {}
    absent = sorted(set(modules) - set(saved_modules))
    if absent:
        raise ValueError(f"checkpoint holds no state for modules {absent}")
    for name, module in modules.items():
        _validate_module_state(name, module, saved_modules[name])
        check_seed_states(module, saved_modules[name], "")  # what its load would refuse
    saved_table = state.get("state_table")
    if state_table is not None:
        if not isinstance(saved_table, torch.Tensor):
            raise ValueError("checkpoint holds no state table")
        if saved_table.shape != state_table.shape or saved_table.dtype != state_table.dtype:
            raise ValueError(
                f"checkpoint state table is {tuple(saved_table.shape)} {saved_table.dtype}, "
                f"expected {tuple(state_table.shape)} {state_table.dtype}"
            )
        if not rows_checked:
            for row in saved_table.tolist():  # as a restore of one row would check it
                checked_row(row)
    if optimizers is not None:
        if state.get("optimizers") is None:
            raise ValueError("checkpoint holds no optimizer state")
        optimizers.validate_state_dict(state["optimizers"])

    # The writes, undone if one of them fails (a device error, a dtype the load cannot cast):
    # the live state is backed up first (on the CPU: a second copy on the model's device could
    # run it out of memory) and put back bit for bit.
    backup = capture_training_state(modules, optimizers, state_table, device="cpu")
    try:
        if optimizers is not None:
            optimizers.load_state_dict(state["optimizers"])
        for name, module in modules.items():
            module.load_state_dict(saved_modules[name], strict=True)
        if state_table is not None:  # int32: no graph (and no grad-mode block, see below)
            state_table.copy_(saved_table.to(state_table.device))
    except BaseException as exc:
        try:
            for name, module in modules.items():
                module.load_state_dict(backup["modules"][name], strict=True)
            if state_table is not None:  # a grad-mode block's exit could take a Ctrl-C
                state_table.copy_(backup["state_table"])
            if optimizers is not None:
                optimizers.load_state_dict(backup["optimizers"])
        except Exception as undo:  # the caller learns what failed first, and that this did
            note = f"undoing the partial restore failed too: {type(undo).__name__}: {undo}"
            exc.__notes__ = [*getattr(exc, "__notes__", ()), note]  # add_note: 3.11 and up
            # Logged as well: Python 3.10's traceback does not print notes.
            logger.error("%s (the restore had failed with %s: %s)", note, type(exc).__name__, exc)
        raise
    logger.info("restored training state for modules %s", sorted(modules))
