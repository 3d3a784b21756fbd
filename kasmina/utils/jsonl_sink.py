"""The JSONL telemetry sink: one JSON object per packet per line, in a bounded pair of files.

A run's durable record of its telemetry (``KasminaConfig.telemetry_jsonl_path``, the demo's
``telemetry.jsonl``). The file is the user's too: a cleanup may delete it or its folder, a log
rotator move it, a user put something else at its path. Before each line the sink checks that the
path still names the file it holds open (device and inode); if not, it starts a new file there
(a folder that was removed is made again, and the sink's lock file with it), logging it once per
change; a rotation renames only the file the sink holds open. The check is two ``stat`` calls a
line.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import threading
from pathlib import Path
from typing import IO

from google.protobuf.json_format import MessageToDict

from kasmina.leyline import TelemetryPacket
from kasmina.utils.checks import check_positive_int
from kasmina.utils.files import name_max, open_regular_fd
from kasmina.utils.locks import fork_safe, lock_exclusive, lock_name, released
from kasmina.utils.orphans import release_orphaned_sinks

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_JSONL_MAX_BYTES", "JsonlFileSink"]


# A JSONL telemetry file is rotated when the next line would take it past this many bytes; one
# rotated file is kept, so the pair stays bounded.
DEFAULT_JSONL_MAX_BYTES = 64 << 20


_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT  # read: the last byte, to find a torn line


def _open_append(path: Path) -> tuple[IO[str], int]:
    """Open ``path`` to append telemetry lines: the handle and the file's size.

    Only a regular file is opened (``open_regular_fd``: a FIFO or a device is refused at once,
    never blocked on). A last line torn by a crash is ended with a newline, so no packet is
    glued onto it.
    """
    fd = open_regular_fd(path, _APPEND_FLAGS, what="telemetry file")
    try:
        size = os.fstat(fd).st_size
        torn = False
        if size:
            os.lseek(fd, -1, os.SEEK_END)  # reads only: O_APPEND writes go to the end anyway
            torn = os.read(fd, 1) != b"\n"
        handle = os.fdopen(fd, "a", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
    try:
        if torn:
            handle.write("\n")  # close the torn line, never glue a packet onto it
            handle.flush()
    except BaseException:
        _close_quietly(handle, path)
        raise
    return handle, size + torn


def _close_quietly(handle: IO[str], path: Path) -> None:
    """Close ``handle``; a flush that fails (a full disk) is logged, never raised, and the file
    is closed all the same (``close`` closes the descriptor even when its flush fails; what it
    could not write is lost)."""
    try:
        handle.close()
    except OSError as exc:
        logger.warning(
            "telemetry file %s: closing it failed to write its last lines (%s: %s); they are lost",
            path,
            type(exc).__name__,
            exc,
        )


def _drop_unwritten(handle: IO[str]) -> None:
    """Close ``handle`` writing nothing of what its buffers hold: its descriptor first, so that
    the buffered layers, finding it closed, close without a flush."""
    try:
        handle.buffer.raw.close()  # type: ignore[attr-defined]
    finally:
        handle.close()


class JsonlFileSink:
    """Appends one JSON object per packet per line (protobuf JSON mapping), flushed each time.

    The file is opened in append mode so that restarts add to the same log; lines written by one
    sink are never interleaved because writes are serialized by a lock. A process killed while
    writing leaves a torn last line: the next sink of the file ends it with a newline before
    its first packet, so the torn line stays one bad line and the new packets stay readable.
    Only a regular file is written: a FIFO, a device or a directory is refused at once.

    The file is bounded: when the next line would take it past ``max_bytes`` it is renamed to
    ``<path>.1`` (replacing the previous one) and a new file is started, always between two
    lines, so the two files hold at most about ``2 * max_bytes`` (a single line larger than
    ``max_bytes`` gets a file to itself). ``close`` never raises: lines a full disk kept in the
    buffer are logged as lost once and the file is closed.

    One live sink writes a file: it holds an exclusive advisory lock (``<path>.lock``, as the
    nonce ledger does) until ``close``, and a second sink of the path, in another process or
    this one, is refused. Two would each count only their own bytes and rotate over each
    other's lines.
    """

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_JSONL_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = check_positive_int("max_bytes", max_bytes)
        self.rotated_path = self.path.with_name(self.path.name + ".1")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if len(os.fsencode(self.rotated_path.name)) > name_max(self.path.parent):  # not at a send
            raise ValueError(f"telemetry file name too long for its rotated <name>.1: {path}")
        # Not a regular file (a FIFO, a device, a directory): refused before a lock file is
        # made beside it. Opened without writing: the live sink, if any, writes the file.
        os.close(open_regular_fd(self.path, _APPEND_FLAGS, what="telemetry file"))
        lock_path = self.path.with_name(lock_name(self.path))
        self._held = lock_exclusive(lock_path)
        if self._held is None:  # perhaps a collected manager's sink, not yet closed
            gc.collect()
            release_orphaned_sinks()
            self._held = lock_exclusive(lock_path)
        if self._held is None:
            raise RuntimeError(
                f"telemetry file {self.path} is held by another live sink (another process, "
                "or another manager in this one): give each its own telemetry_jsonl_path"
            )
        self._lock = fork_safe(threading.Lock())
        self._file: IO[str] | None  # None after a rotation's failed re-open, or close()
        try:
            self._file, self._size = _open_append(self.path)
        except BaseException:
            self._held.close()
            raise

    def send(self, packet: TelemetryPacket) -> None:
        line = json.dumps(MessageToDict(packet, preserving_proto_field_name=True), sort_keys=True)
        line += "\n"  # ASCII (json.dumps escapes the rest): its length is its size in bytes
        with self._lock:
            if released(self._held):  # closed, or a forked child's (the parent's file)
                raise ValueError(f"telemetry file {self.path} is closed (or a forked child's)")
            if self._file is not None and not self._still_at_path(self._file):
                self._reopen()  # deleted, moved or replaced since: a new file at the path
            if self._file is None:  # a failed re-open (a full disk, a refused lock): again now
                self._open_at_path()
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._size += len(line)
            self._file.write(line)
            self._file.flush()

    def _rotate(self) -> None:
        """Move the full file to ``<path>.1`` and start a new one (under the lock)."""
        file, self._file = self._file, None
        if file is not None:
            _close_quietly(file, self.path)
        try:
            os.replace(self.path, self.rotated_path)
        finally:  # a failed rename keeps the full file, a failed re-open none: both retried
            self._file, self._size = _open_append(self.path)

    def _still_at_path(self, file: IO[str]) -> bool:
        """Whether ``self.path`` still names ``file`` (the same device and inode)."""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(file.fileno())
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def _reopen(self) -> None:
        """Close the file the path no longer names and open one there (its folder made again
        if it was removed); what is at the path now, if not a regular file, is refused by
        ``_open_append`` (a sink error) and never renamed."""
        file, self._file = self._file, None
        assert file is not None
        _close_quietly(file, self.path)
        logger.warning(
            "telemetry file %s was deleted, moved or replaced while written: starting a new "
            "file there (the lines before are wherever the old one went)",
            self.path,
        )
        self._open_at_path()

    def _open_at_path(self) -> None:
        """Open the file at the path (its folder made again if it was removed), holding the
        path's lock file first: a retry after a refused lock must not write beside the sink
        that took the path's new lock meanwhile."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._relock()
        self._file, self._size = _open_append(self.path)

    def _relock(self) -> None:
        """Hold the lock file at the path again if it is not the one held (deleted with its
        folder): another sink of the path would take a new one and write beside this one."""
        lock_path = self.path.with_name(lock_name(self.path))
        try:
            here = os.stat(lock_path)
        except FileNotFoundError:
            here = None
        held = os.fstat(self._held.fileno())
        if here is not None and (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
            return
        taken = lock_exclusive(lock_path)
        if taken is None:
            raise RuntimeError(f"telemetry file {self.path} is held by another live sink now")
        self._held.close()
        self._held = taken

    def close(self) -> None:
        # Its lock is made free in a forked child (``fork_safe``): a parent thread writing a line
        # at the fork held it there for good, and the child's close() hung. The child writes
        # none of it: its copy of the file is the parent's, and what its buffer held at the fork
        # (that thread's line, not yet flushed) is dropped, never written into the parent's file.
        with self._lock:
            file, self._file = self._file, None
            if file is not None and released(self._held):  # a forked child's copy
                _drop_unwritten(file)
            elif file is not None:
                _close_quietly(file, self.path)
            self._held.close()  # the lock, last: no other sink writes before this one is done

    def __enter__(self) -> JsonlFileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
