"""Atomic files: the old version or the new one, never half of one (no torch here, so that a
controller's nonce ledger and a CLI's key files load without it).

**Atomic.** Every file is written to a temporary name in the same directory, flushed and
fsync'd, then moved over the target with ``os.replace`` (atomic on POSIX and Windows), and the
directory is fsync'd so the rename itself survives a crash (``atomic_write_bytes``).

**Never half a new file either.** A file that must not replace an existing one (a key) is
written the same way and then put in place without overwriting (``install_new_file``). The temp
file of a killed write is garbage; ``remove_stale_temporaries`` removes those of given names
once no live writer can own them.

**Private unless asked.** Files are created 0600 (keys, checkpoints); with ``private=False``
0666 less the umask, as a plain ``open`` makes them (an artifact store's files, which readers
under other accounts may serve or load).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, TypeVar

from kasmina.utils.files import fitting_name
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.locks import lock_exclusive

__all__ = [
    "STALE_TEMPORARY_S",
    "atomic_write",
    "atomic_write_bytes",
    "fsync_directory",
    "install_new_file",
    "remove_stale_temporaries",
    "remove_stale_temporaries_of",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# A temp file untouched this long (seconds) belongs to no live writer: every write here makes
# its file in one go, so a live one is seconds old at most, even for a large checkpoint.
STALE_TEMPORARY_S = 600.0
# What a temp file's name adds to its target's: ``.<name>.<8 random>.tmp`` (or a pid: at most
# 7 digits on Linux), so every writer and the clean-up cut a long name alike (``temporary_stem``).
_TEMPORARY_EXTRA = len(".") + len(".") + 8 + len(".tmp")
# ``os.link`` errors that mean "no hard links on this filesystem", not "the link failed".
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Persist a rename, link or unlink in ``directory`` (POSIX); a no-op where directories
    cannot be opened or synced (the files themselves are synced by their writers)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    # Some filesystems refuse fsync on a directory; the file itself is already synced.
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], None], *, private: bool = True
) -> Path:
    """Call ``write`` on a temp file beside ``path``, fsync it, then ``os.replace`` it over
    ``path``. On any failure the temp file is removed, ``path`` is untouched, the error
    propagates. The file is 0600, or with ``private=False`` 0666 less the umask."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    replace = lambda tmp_name: os.replace(tmp_name, target)  # noqa: E731
    _through_temporary(target, write, replace, private=private)
    fsync_directory(target.parent)
    return target


def _through_temporary(
    target: Path,
    write: Callable[[IO[bytes]], None],
    commit: Callable[[str], _T],
    *,
    private: bool = True,
) -> _T:
    """Write a temp file beside ``target`` (``.<name>.<random>.tmp``, mode 0600 or, not
    ``private``, 0666 less the umask; the name ``remove_stale_temporaries`` knows; a name too
    long for that is cut, ``fitting_name``) with ``write``, fsync it, and return
    ``commit(path)``
    (which moves or links it into place). The temp file never outlives the call, whatever
    fails, a Ctrl-C included: its creation and its removal hold SIGINT, so neither a signal
    just after the file exists nor a second Ctrl-C during the clean-up leaves it behind."""
    tmp_name: str | None = None
    try:
        with interrupts_deferred():
            stem = temporary_stem(target.parent, target.name)
            if private:
                fd, tmp_name = tempfile.mkstemp(
                    prefix=f".{stem}.", suffix=".tmp", dir=target.parent
                )
            else:
                fd, tmp_name = _shared_temporary(target.parent, stem)
            handle = os.fdopen(fd, "wb")
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        return commit(tmp_name)
    finally:
        if tmp_name is not None:  # gone already when ``commit`` moved it
            with interrupts_deferred(), contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


def _shared_temporary(directory: Path, stem: str) -> tuple[int, str]:
    """``tempfile.mkstemp``'s loop for a file made 0666 less the umask (mkstemp's are 0600):
    a new ``.<stem>.<8 random>.tmp`` in ``directory``, opened for writing; its fd and path."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        name = os.path.abspath(os.path.join(directory, f".{stem}.{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", os.fspath(directory))


def temporary_stem(directory: str | os.PathLike[str], name: str) -> str:
    """The name a temp file beside ``name`` is named after (``.<stem>.<8 random or a pid>.tmp``):
    ``name``, cut where that would be too long for ``directory`` (``fitting_name``)."""
    return fitting_name(directory, name, _TEMPORARY_EXTRA)


def remove_stale_temporaries(
    directory: str | os.PathLike[str],
    final_name: str,
    *,
    older_than_s: float | None = STALE_TEMPORARY_S,
) -> list[Path]:
    """Delete from ``directory`` the temp files (``.<final name>.<random>.tmp``, as every
    writer here names them) of killed writes of files whose names match the regular expression
    ``final_name``; the removed paths. They never replaced their target, so they are garbage
    once no live writer owns them: with ``older_than_s=None`` the caller knows there is none
    (it holds the lock under which these names are written), otherwise only those unmodified
    for ``older_than_s`` seconds go. Failures are logged: a leftover is only disk. One file's
    (its long name perhaps cut for them): ``remove_stale_temporaries_of``."""
    temporary = re.compile(rf"\.(?:{final_name})\.[^.]+\.tmp")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no directory yet (nothing was written), or unreadable: nothing to do
        return removed
    now = time.time()
    for entry in entries:
        if not temporary.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                continue
            if older_than_s is not None and now - info.st_mtime < older_than_s:
                continue  # may be a live writer's
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # its writer finished (or someone else removed it) meanwhile
        except OSError:
            logger.warning("could not remove the stale temp file %s", entry.path, exc_info=True)
            continue
        logger.warning("removed the temp file of an interrupted write: %s", entry.path)
        removed.append(Path(entry.path))
    return removed


def remove_stale_temporaries_of(
    target: Path, *, older_than_s: float | None = STALE_TEMPORARY_S
) -> list[Path]:
    """``remove_stale_temporaries`` of the file ``target``: its temp files named after its name
    or, where that was too long for them, after the cut one (``temporary_stem``)."""
    names = {re.escape(target.name), re.escape(temporary_stem(target.parent, target.name))}
    return remove_stale_temporaries(
        target.parent, "|".join(sorted(names)), older_than_s=older_than_s
    )


def _replace_if_absent(tmp_name: str, target: Path) -> bool:
    """Where there are no hard links: move ``tmp_name`` to ``target`` unless something is
    there, under an exclusive lock on ``.<name>.lock`` beside it that every writer of
    ``install_new_file`` takes, so two of them cannot both see ``target`` absent. The residual
    window: a writer that bypasses this function, or a platform without advisory locks (not
    POSIX; NFS across hosts where ``flock`` is not forwarded), may still race the check and the
    rename, and then the later rename replaces the earlier file."""
    lock_path = target.with_name(f".{fitting_name(target.parent, target.name, 6)}.lock")
    deadline = time.monotonic() + 30.0
    while (lock := lock_exclusive(lock_path)) is None:
        if time.monotonic() > deadline:  # held for a check and a rename: this is no writer
            raise TimeoutError(f"the install lock {lock_path} stayed held for 30 s")
        time.sleep(0.01)
    with lock:
        try:
            os.lstat(target)
        except FileNotFoundError:
            os.replace(tmp_name, target)
            return True
        return False


def install_new_file(path: str | os.PathLike[str], data: bytes, *, private: bool = True) -> bool:
    """Put ``data`` at ``path`` (mode 0600; with ``private=False`` 0666 less the umask) unless
    something is already there (False then, nothing written), so that a kill at any point
    leaves no file at ``path`` or the whole one.

    Why not create ``path`` and write it: a kill between the two leaves a torn file under the
    final name, which then blocks every retry. So the bytes go to a temp file beside ``path``,
    are fsync'd, and only then appear at ``path``: by a hard link, which never overwrites (two
    concurrent writers: exactly one wins), or where the filesystem has none by a rename under a
    lock (``_replace_if_absent``); then the directory is fsync'd. The temp file of a killed
    write is left for ``remove_stale_temporaries``.
    """
    target = Path(path)

    def link(tmp_name: str) -> bool:
        try:
            os.link(tmp_name, target)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            return _replace_if_absent(tmp_name, target)
        return True

    if not _through_temporary(target, lambda handle: handle.write(data), link, private=private):
        return False
    fsync_directory(target.parent)
    return True


def atomic_write_bytes(
    path: str | os.PathLike[str], chunks: Iterable[bytes], *, private: bool = True
) -> Path:
    """Write ``chunks`` to ``path`` atomically (temp file beside it, fsync, ``os.replace``,
    directory fsync): a crash leaves the old file or the new one, never half of one. Creates
    the parent directory if needed; the file is created with mode 0600 (with ``private=False``
    0666 less the umask)."""

    def write(handle: IO[bytes]) -> None:
        for chunk in chunks:
            handle.write(chunk)

    return atomic_write(path, write, private=private)
