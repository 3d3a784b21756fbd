"""Atomic epoch checkpoints, retention, and the capture/restore pair behind a rollback.

Why atomic: a crash (or a full disk) while a checkpoint is written must never leave a truncated
file where a good one was. Every file is written to a temporary name in the same directory,
flushed and fsync'd, then moved over the target with ``os.replace`` (atomic on POSIX and
Windows), so readers see the old file or the new one, never half of one.

Why capture/restore helpers: a ``RollbackCommand`` must put seeds' weights, the lifecycle state
table and every optimizer's state back bit for bit. ``capture_training_state`` snapshots them
(cloned, so later training cannot mutate the snapshot) and ``restore_training_state`` validates
everything before it changes anything, so a bad checkpoint is rejected with the live state intact.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kasmina.utils.state_io import atomic_torch_save, clone_state, safe_torch_load

if TYPE_CHECKING:
    from kasmina.isolation.optimizers import IsolatedOptimizerManager

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class CheckpointManager:
    """Epoch checkpoints ``epoch_<n>.pt`` in one directory, keeping the newest ``keep_last``.

    Saving epoch ``n`` also removes checkpoints of epochs after ``n``: they belong to a timeline
    that a rollback abandoned, and keeping them would make ``latest_epoch`` point at stale state.
    """

    _NAME = re.compile(r"^epoch_(\d+)\.pt$")

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()

    def path_for(self, epoch: int) -> Path:
        return self.directory / f"epoch_{self._check_epoch(epoch):08d}.pt"

    def epochs(self) -> list[int]:
        """Epochs with a complete checkpoint on disk, ascending."""
        found = []
        for entry in self.directory.iterdir():
            match = self._NAME.match(entry.name)
            if match and entry.is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_epoch(self) -> int | None:
        epochs = self.epochs()
        return epochs[-1] if epochs else None

    def save(self, epoch: int, state: Mapping[str, Any]) -> Path:
        """Write ``state`` for ``epoch`` atomically, then apply retention."""
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoint state must be a mapping, got {type(state).__name__}")
        path = atomic_torch_save(dict(state), self.path_for(epoch))
        logger.info("checkpoint for epoch %d written to %s", epoch, path)
        self._prune(epoch)
        return path

    def load(self, epoch: int, map_location: Any = None) -> dict[str, Any]:
        path = self.path_for(epoch)
        if not path.is_file():
            raise FileNotFoundError(
                f"no checkpoint for epoch {epoch} in {self.directory} (have {self.epochs()})"
            )
        return safe_torch_load(path, map_location=map_location)

    def _check_epoch(self, epoch: int) -> int:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        return epoch

    def _prune(self, saved_epoch: int) -> None:
        epochs = self.epochs()
        abandoned = [e for e in epochs if e > saved_epoch]
        kept = [e for e in epochs if e <= saved_epoch]
        expired = kept[: max(0, len(kept) - self.keep_last)]
        for epoch in abandoned + expired:
            self.path_for(epoch).unlink(missing_ok=True)
        if abandoned:
            logger.info("removed checkpoints of abandoned epochs %s", abandoned)

    def _remove_stale_temporaries(self) -> None:
        """Temp files left by a crash mid-write are garbage: the target was never replaced."""
        for entry in self.directory.glob(".epoch_*.pt.*.tmp"):
            logger.warning("removing incomplete checkpoint temp file %s", entry)
            entry.unlink(missing_ok=True)


def capture_training_state(
    modules: Mapping[str, nn.Module],
    optimizers: IsolatedOptimizerManager | None = None,
    state_table: torch.Tensor | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Snapshot module weights, optimizer states and the state table (all cloned).

    The result holds only tensors and plain containers, so it can be saved with
    ``CheckpointManager.save`` and loaded back with ``weights_only=True``.
    """
    state: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "modules": {name: clone_state(module.state_dict()) for name, module in modules.items()},
        "optimizers": clone_state(optimizers.state_dict()) if optimizers is not None else None,
        "state_table": state_table.detach().clone() if state_table is not None else None,
    }
    if extra is not None:
        state["extra"] = clone_state(dict(extra))
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
        value = saved[key]
        if isinstance(tensor, torch.Tensor) and (
            not isinstance(value, torch.Tensor) or value.shape != tensor.shape
        ):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"checkpoint for {name}.{key} has shape {got}, expected {tuple(tensor.shape)}"
            )


def restore_training_state(
    state: Mapping[str, Any],
    modules: Mapping[str, nn.Module],
    optimizers: IsolatedOptimizerManager | None = None,
    state_table: torch.Tensor | None = None,
) -> None:
    """Put back what ``capture_training_state`` took, bit for bit.

    Everything is validated first (module keys and shapes, optimizer layout, state-table shape
    and dtype); only then is anything written, so a mismatched checkpoint raises ``ValueError``
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
    saved_table = state.get("state_table")
    if state_table is not None:
        if not isinstance(saved_table, torch.Tensor):
            raise ValueError("checkpoint holds no state table")
        if saved_table.shape != state_table.shape or saved_table.dtype != state_table.dtype:
            raise ValueError(
                f"checkpoint state table is {tuple(saved_table.shape)} {saved_table.dtype}, "
                f"expected {tuple(state_table.shape)} {state_table.dtype}"
            )
    if optimizers is not None:
        if state.get("optimizers") is None:
            raise ValueError("checkpoint holds no optimizer state")
        optimizers.validate_state_dict(state["optimizers"])

    # The writes, undone if one of them fails (a device error, a dtype the load cannot cast):
    # the live state is backed up first and put back bit for bit.
    backup = capture_training_state(modules, optimizers, state_table)
    try:
        if optimizers is not None:
            optimizers.load_state_dict(state["optimizers"])
        for name, module in modules.items():
            module.load_state_dict(saved_modules[name], strict=True)
        if state_table is not None:
            with torch.no_grad():
                state_table.copy_(saved_table.to(state_table.device))
    except BaseException:
        for name, module in modules.items():
            module.load_state_dict(backup["modules"][name], strict=True)
        if state_table is not None:
            with torch.no_grad():
                state_table.copy_(backup["state_table"])
        if optimizers is not None:
            optimizers.load_state_dict(backup["optimizers"])
        raise
    logger.info("restored training state for modules %s", sorted(modules))
