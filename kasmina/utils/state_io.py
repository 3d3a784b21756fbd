"""Atomic state I/O: files that are either the old version or the new one, never half of one.

Every file is written to a temporary name in the same directory, flushed and fsync'd, then moved
over the target with ``os.replace`` (atomic on POSIX and Windows), and the directory is fsync'd
so the rename itself survives a crash. Loads use ``weights_only=True`` (tensors and plain
containers only); ``clone_state`` deep-copies the tensors of a nested state so later training
cannot mutate a snapshot.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_torch_save", "clone_state", "safe_torch_load"]


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    # Some filesystems refuse fsync on a directory; the file itself is already synced.
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically: temp file in the same dir, fsync, replace.

    Creates the parent directory if needed. On any failure the temporary file is removed, the
    previous file at ``path`` (if any) is untouched, and the error propagates.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(target.parent)
    return target


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only."""
    return torch.load(path, map_location=map_location, weights_only=True)


def clone_state(value: Any) -> Any:
    """Deep copy of nested dicts/lists/tuples, cloning tensors (detached) and keeping scalars."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: clone_state(item) for key, item in value.items()}
    if isinstance(value, list):
        return [clone_state(item) for item in value]
    if isinstance(value, tuple):
        return tuple(clone_state(item) for item in value)
    return value
