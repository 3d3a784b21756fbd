"""Exclusive advisory file locks: one live owner of a piece of run state at a time.

Why the kernel's ``flock`` on a lock file, rather than a file that names its owner: the kernel
drops the lock when its process dies, however it dies, so a lock never outlives its owner and a
restart after a crash is never blocked. The lock belongs to the open file: it is held until that
file is closed (or collected), and no other open of the same path, in another process or in
this one, can take it meanwhile (on NFS, where Linux emulates ``flock`` with byte-range locks
that belong to the process, only another process is kept out). Where the platform has no
advisory locks the file is opened without one, and a single owner is the caller's duty.

Why a child closes them: an open file is shared with every ``fork()``ed child (a
multiprocessing or DataLoader worker under the ``fork`` start method), and a ``flock`` lives
until the last descriptor of its open file closes, so a child that outlived a killed owner
would keep the lock and refuse the restart. Every lock taken here is recorded (weakly), and a
forked child closes its copies at once (``os.register_at_fork``): the parent's lock is
untouched (closing one descriptor of a shared open file does not unlock it), and the child
holds none. A child started by ``exec`` inherits none anyway (the files are non-inheritable).

Why some thread locks are made again in a child (``fork_safe``): ``fork()`` copies only the
thread that called it, so a lock another thread held at that instant stays held in the child for
good, its holder gone, and the child's first take of it blocks forever (a worker unpickling a
model with a seed while a fetch worker of its parent loaded a kernel; a worker's ``close()`` of
its copy of the manager while a controller thread of its parent wrote a command's line). A lock
passed to ``fork_safe`` is made new and free in a forked child, as ``logging`` does with its
handlers' locks. It is for the locks the process's other threads take (the fetch workers, the
store's reads, controller threads, any thread's telemetry or faults, a collection running a
teacher's release) around state that is whole between their turns, or that the child refuses to
use: the kernel loads' (``urza.kernel``), the kernel cache's and its holders', the loader's, the
Urza client's and its circuit breaker's, the command verifier's, the nonce ledger's, the
handler's counts, the command queue's and its door, the relay's and the coordinator's, the
faults', the teacher-parameter registry's (``kd.holds``), telemetry's, the JSONL sink's, the
checkpoint signer's, the module-wide counters' and tables' (the state that a thread gone at the
fork left half made in one of them is said where it is made fork-safe), and the manager's safe
point's (a thread of the parent waiting there for a fetch, holding no change of the model, held
every safe point of the child off; the manager's own lock still guards what a safe point
changes). Not the locks around the model's changes (the manager's, a teacher's cast), which the
training thread takes, and a fork is made from it, between its steps: a fork while another
thread held one would leave the child a model half changed, which a free lock would hide.

Why a fork waits for a few writes (``whole_at_fork``): a pin a fetch worker takes on a cached
kernel and its record on the command it is for are two writes; a child forked between them
found the pin taken and no command holding it, and pinned the kernel again for the command: one
pin was never given back, and the kernel never evicted. Writes that must land in a child
together or not at all are made under ``whole_at_fork``, which ``fork()`` takes before it forks
(``os.register_at_fork``) and gives back after, in both processes. Only short writes in memory
go there: a fork waits for them.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
import weakref
from pathlib import Path
from typing import Protocol, TypeVar

from kasmina.utils.files import fitting_name, open_regular_fd

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

__all__ = ["fork_safe", "lock_exclusive", "lock_name", "released", "require_held", "whole_at_fork"]


class _Remakeable(Protocol):
    def _at_fork_reinit(self) -> None: ...


_Lock = TypeVar("_Lock", bound=_Remakeable)

# The open lock files of this process: a forked child closes its copies of them.
_HELD: weakref.WeakSet[io.FileIO] = weakref.WeakSet()
# The thread locks (and conditions) a forked child makes new and free (``fork_safe``).
_FORK_SAFE: weakref.WeakSet[_Remakeable] = weakref.WeakSet()
# Held over writes that a forked child must see whole (``whole_at_fork``); reentrant, so that a
# fork made inside such a section (a sink's, say) does not wait for itself.
_WHOLE = threading.RLock()


def _close_in_child() -> None:
    """After ``fork()``, in the child: close the inherited lock files (never unlock them, which
    would release the parent's lock; closing a copy does not), and make the ``fork_safe``
    locks new and free."""
    for lock_file in list(_HELD):
        with contextlib.suppress(OSError):
            lock_file.close()
    _HELD.clear()
    for lock in list(_FORK_SAFE):  # their holders, other threads, are gone in the child
        lock._at_fork_reinit()
    _WHOLE._at_fork_reinit()  # taken by the forking thread before the fork: free again


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_WHOLE.acquire, after_in_parent=_WHOLE.release, after_in_child=_close_in_child
    )


def whole_at_fork() -> contextlib.AbstractContextManager[object]:
    """A section whose writes a ``fork()``ed child sees all or none of: a fork made meanwhile on
    another thread waits until it ends (see the module doc). For short writes in memory only
    (never I/O, nor a wait for another thread)."""
    return _WHOLE


def fork_safe(lock: _Lock) -> _Lock:
    """``lock`` (a ``threading.Lock``, ``RLock`` or ``Condition``, or an object with an
    ``_at_fork_reinit`` of its own: the kernel loader's forgets its loads in flight), made new
    and free in every child this process ``fork()``s from now on (held weakly, while it lives).
    For a lock that threads other than the training thread take (see the module doc); the state
    it guards must be whole between their turns, or unused in a child."""
    _FORK_SAFE.add(lock)
    return lock


def released(lock_file: io.FileIO | None) -> bool:
    """Whether ``lock_file`` (from ``lock_exclusive``; None: no lock was taken) no longer holds
    its lock in this process: closed by its owner, or at a ``fork()`` in a child. What it
    guards is then not this process's to write: a forked child's copy of a run's ledger,
    checkpoint store or telemetry file still has the parent's files open, and its writes (an
    ``end_epoch`` pruning the parent's checkpoints, a ``close()`` reporting into its JSONL)
    would land in the parent's run."""
    return lock_file is not None and lock_file.closed


def lock_exclusive(path: str | os.PathLike[str]) -> io.FileIO | None:
    """Open ``path`` (created if missing; its directory must exist) and lock it exclusively
    without waiting: the open file, which holds the lock until it is closed (in this process; a
    forked child never holds it), or None when another open file holds it (a live process, or
    another owner in this one). A filesystem that gives no lock at all (NFS without its lock
    service: ``ENOLCK``) raises its ``OSError``, never None: no holder to go and look for. A
    path that is not a regular file (a FIFO planted there, which a plain open would block on for
    good) or is a symlink is refused (``NotARegularFileError``, ``OSError``), never opened
    through."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    lock_file = io.FileIO(open_regular_fd(Path(path), flags, what="lock file"), "a")
    if fcntl is None:
        return lock_file
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock_file.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None  # naming the file
    _HELD.add(lock_file)
    return lock_file


def lock_name(path: Path) -> str:
    """The name of the lock file beside ``path``: ``<name>.lock``, its name cut where that would
    be too long for the directory (``fitting_name``: a legal name of 251-255 bytes got a lock
    file name the filesystem refused)."""
    return fitting_name(path.parent, path.name, len(".lock")) + ".lock"


def require_held(lock_file: io.FileIO | None, what: str) -> None:
    """``RuntimeError`` when ``lock_file`` was ``released``: ``what`` it guards is not this
    process's to write (closed, or a forked child's copy of its owner)."""
    if released(lock_file):
        raise RuntimeError(f"{what} are not this process's to write (closed, or a forked child)")
