"""Exclusive advisory file locks: one live owner of a piece of run state at a time.

Why the kernel's ``flock`` on a lock file, rather than a file that names its owner: the kernel
drops the lock when its process dies, however it dies, so a lock never outlives its owner and a
restart after a crash is never blocked. The lock belongs to the open file: it is held until that
file is closed (or collected), and no other open of the same path, in another process or in
this one, can take it meanwhile (on NFS, where Linux emulates ``flock`` with byte-range locks
that belong to the process, only another process is kept out). Where the platform has no
advisory locks the file is opened without one, and a single owner is the caller's duty.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["lock_exclusive"]


def lock_exclusive(path: str | os.PathLike[str]) -> io.FileIO | None:
    """Open ``path`` (created if missing; its directory must exist) and lock it exclusively
    without waiting: the open file, which holds the lock until it is closed, or None when
    another open file holds it (a live process, or another owner in this one)."""
    lock_file = io.FileIO(Path(path), "a")
    if fcntl is None:
        return lock_file
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.close()
        return None
    return lock_file
