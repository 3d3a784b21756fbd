"""Local regular files only, read within bounds: a FIFO or a device is refused, never waited on.

Key, keyring and trusted-publishers files, checkpoints, saved models, the entries of a local
Urza store and the JSONL telemetry file are all opened through ``open_regular_fd``, which
guarantees:

- **Regular files only.** Symlinks are followed, then anything but a regular file (a directory,
  a FIFO, a character or block device) raises ``NotARegularFileError``, a ``ValueError`` that
  names the file and what it is (a socket cannot be opened at all: ``OSError``).
- **Never blocked on.** The file is opened non-blocking and checked with ``fstat`` on the open
  descriptor, so opening a FIFO nobody writes to returns at once, and a swap between a check
  and the open cannot slip one in; a regular file's descriptor is made blocking again.
- **Bounded reads.** ``read_regular_file`` (and ``read_text_file`` on top of it) reads at most
  ``limit + 1`` bytes, so a huge file under a key or config file's name costs one bounded
  read and a ``ValueError``, not all memory.

Why: these paths come from configuration or from a directory someone else may write to. A plain
``open`` of a FIFO blocks until a writer appears, and a read of ``/dev/zero`` never ends; either
would hang a trainer at start-up or at a checkpoint, where the right answer is an error naming
the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import BinaryIO

from kasmina.errors import NotARegularFileError

__all__ = [
    "MAX_CONFIG_FILE_BYTES",
    "fitting_name",
    "name_max",
    "open_regular_fd",
    "open_regular_file",
    "read_regular_file",
    "read_text_file",
]


# A keyring or trusted-publishers file is a few kilobytes; anything larger is not one.
MAX_CONFIG_FILE_BYTES = 1 << 20
# The longest file name (bytes) where a directory does not say (NAME_MAX: ext4, xfs, tmpfs).
DEFAULT_NAME_MAX = 255
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def fitting_name(directory: str | os.PathLike[str], name: str, extra: int) -> str:
    """``name``, or where ``extra`` more bytes (what a temp or lock file's name adds to it)
    would take it past ``directory``'s longest file name, its head, ``~`` and 8 hex digits of
    its hash, cut to fit: a legal name of 242-255 bytes got a temp or lock file name of its own
    the filesystem refused ("File name too long"). The same name for every writer and cleanup,
    and two long names with one head get two names."""
    limit = name_max(directory)
    raw = os.fsencode(name)
    if len(raw) + extra <= limit:
        return name
    tag = "~" + hashlib.sha256(raw).hexdigest()[:8]
    head = name
    while head and len(os.fsencode(head)) + len(tag) + extra > limit:
        head = head[:-1]
    return head + tag


def name_max(directory: str | os.PathLike[str]) -> int:
    """The longest file name (bytes) ``directory`` takes (``DEFAULT_NAME_MAX`` if it says not)."""
    try:
        limit = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no such directory yet; not POSIX
        return DEFAULT_NAME_MAX
    return limit if limit > 0 else DEFAULT_NAME_MAX


def open_regular_fd(
    path: str | os.PathLike[str], flags: int, *, what: str = "file", mode: int = 0o666
) -> int:
    """``os.open(path, flags)`` (plus non-blocking, no controlling tty, close-on-exec),
    refusing at once anything but a regular file (symlinks are followed): opened non-blocking
    and checked with ``fstat`` on the open descriptor, so a FIFO never blocks and a swap after a
    check cannot slip one in; the descriptor is blocking again on return. Raises
    ``NotARegularFileError`` (a ``ValueError`` naming ``what`` and ``path``); ``OSError`` as
    ``open`` does (missing, no permission, a socket)."""
    nonblock = getattr(os, "O_NONBLOCK", 0)
    extra = nonblock | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | extra | getattr(os, "O_BINARY", 0), mode)
    except IsADirectoryError:  # an open to write: one to read opens it, and fstat refuses it
        raise NotARegularFileError(os.fspath(path), "a directory", what) from None
    except OSError as exc:  # a FIFO without a reader, opened to write without blocking
        if exc.errno == errno.ENXIO and stat.S_ISFIFO(os.stat(path).st_mode):
            raise NotARegularFileError(os.fspath(path), "a FIFO", what) from None
        raise
    try:
        st_mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(st_mode):
            kind = next((k for test, k in _KINDS if test(st_mode)), "not a file")
            raise NotARegularFileError(os.fspath(path), kind, what)
        if nonblock:
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_regular_file(path: str | os.PathLike[str], *, what: str = "file") -> BinaryIO:
    """Open a local regular file to read (``open_regular_fd``): a FIFO, a device or a
    directory is refused at once, never blocked on."""
    fd = open_regular_fd(path, os.O_RDONLY, what=what)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(
    path: str | os.PathLike[str], limit: int = MAX_CONFIG_FILE_BYTES, *, what: str = "file"
) -> tuple[bytes, os.stat_result]:
    """The bytes of a local regular file (``open_regular_file``) and its ``fstat``, reading at
    most ``limit + 1`` bytes: a longer file raises ``ValueError`` naming ``path``."""
    with open_regular_file(path, what=what) as f:
        st = os.fstat(f.fileno())
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {os.fspath(path)} is larger than {limit} bytes; not read whole")
    return data, st


def read_text_file(path: str | os.PathLike[str], *, what: str) -> tuple[str, os.stat_result]:
    """``read_regular_file`` decoded as UTF-8; undecodable bytes raise ``ValueError`` naming
    ``path``."""
    data, st = read_regular_file(path, what=what)
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} {os.fspath(path)} is not UTF-8 text ({exc.reason})") from None
