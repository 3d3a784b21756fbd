"""The nonce ledger on disk: replay protection that survives a restart (docs/design.md §5).

``CommandVerifier`` (``kasmina.control.auth``) keeps the nonces it accepted in memory for the
freshness window; with a ``NonceLedger`` it also appends each one to a file in the run's state
directory before its command can take effect, and reads the file back when it starts, so a
restarted trainer refuses a command an earlier process of the same run already accepted. The
file is bounded (rewritten atomically with only the nonces still inside the window), every line
carries a CRC so a torn write is skipped, and an advisory lock keeps a second live process off it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import threading
import zlib
from collections.abc import Callable, Container, Iterable
from pathlib import Path

from kasmina.utils.atomic import remove_stale_temporaries_of, temporary_stem
from kasmina.utils.checks import check_positive_int
from kasmina.utils.files import read_regular_file
from kasmina.utils.locks import fork_safe, lock_exclusive, lock_name, released

logger = logging.getLogger(__name__)

__all__ = [
    "DURABILITY_MODES",
    "LEDGER_COMPACT_SLACK",
    "LEDGER_FILE_NAME",
    "MAX_LIVE_NONCES",
    "NonceLedger",
]

LEDGER_FILE_NAME = "nonces.log"
# "fsync": each accepted nonce reaches the disk (fdatasync) before its command is accepted, so
# it survives a power loss; concurrent arrivals share one fdatasync. "flush": it reaches the
# operating system (one write), which survives the process crashing or being killed, not the
# machine losing power.
DURABILITY_MODES = ("fsync", "flush")
# Lines the ledger file may hold beyond twice its live nonces before it is rewritten: each
# rewrite (O(live nonces)) is paid for by at least this many appends.
LEDGER_COMPACT_SLACK = 4096
# The most a ledger file may hold when it is read (a record is about 100 bytes; compaction
# keeps a file near twice the live nonces): a larger one is not this ledger's, or is damaged.
MAX_LEDGER_BYTES = 1 << 28
# The longest record (a 256-character nonce of 4-byte characters: 2,048 hex digits, with its
# timestamp and CRC), and so the most nonces a verifier keeps live at once: a file compaction
# lets grow to twice them plus the slack, of records that long, is still readable.
MAX_LEDGER_LINE_BYTES = 2_100
MAX_LIVE_NONCES = (MAX_LEDGER_BYTES // MAX_LEDGER_LINE_BYTES - LEDGER_COMPACT_SLACK) // 2
_LEDGER_HEADER = (
    b"# kasmina nonce ledger v1: 'N <timestamp> <nonce hex> <crc32>' | 'F <floor> - <crc32>'\n"
)


_crc32 = zlib.crc32


def _ledger_line(kind: str, timestamp: float, nonce: str) -> bytes:
    """One record: the CRC-32 of the rest of the line lets a torn or damaged line be skipped."""
    body = f"{kind} {timestamp!r} {nonce.encode('utf-8').hex() if nonce else '-'}".encode("ascii")
    return body + b" %08x\n" % _crc32(body)


def _parse_ledger_line(line: bytes) -> tuple[str, float, str] | None:
    """``(kind, timestamp, nonce)`` of a well-formed record, or None."""
    body, _, crc = line.rpartition(b" ")
    parts = body.split(b" ")
    if len(parts) != 3 or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        kind, stamp, encoded = parts[0].decode("ascii"), float(parts[1]), parts[2]
        if not math.isfinite(stamp):
            return None
        if kind == "F" and encoded == b"-":
            return kind, stamp, ""
        if kind == "N" and encoded != b"-":
            return kind, stamp, bytes.fromhex(encoded.decode("ascii")).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; elsewhere the rename is all there is)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_datasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


class NonceLedger:
    """The nonces a verifier accepted, on disk: a restarted trainer refuses what it accepted.

    Why: the in-memory ledger dies with its process, so without this file a command captured
    less than one freshness window before a restart could be replayed after it. The verifier
    reads the file when it starts, keeps what is still inside the window, and appends every
    nonce it accepts before the command counts as accepted.

    **Format.** An append-only text file of one record per line, ``N <timestamp> <nonce hex>
    <crc32>`` per accepted nonce and ``F <floor> - <crc32>`` for the verifier's floor (the newest
    timestamp it forgot, docs/design.md §5). The CRC covers the rest of the line, so a line torn
    by a crash, or damaged, is recognised and skipped with a warning.

    **Bounded.** The file is rewritten atomically (temporary file, fsync, rename, directory
    fsync) when the verifier starts, with only the nonces inside the window, and again whenever
    it holds more than ``2 x live nonces + compact_slack`` lines, so it never outgrows a small
    multiple of the in-memory ledger (at most ``rate x 2 x window`` nonces).

    **Durability** (``DURABILITY_MODES``): ``"fsync"`` writes and fdatasyncs each nonce before its
    command is accepted (about one disk flush per command, a few hundred microseconds on an SSD;
    threads arriving together share one: group commit); ``"flush"`` only writes it to the
    operating system (microseconds; lost only if the machine itself goes down).

    **One owner.** An exclusive advisory lock on ``<path>.lock`` is held while the ledger is
    open, so two live trainers can never share (and corrupt) one ledger; the kernel drops the
    lock when its process dies, so a restart after a crash is never blocked.

    **Staged records.** A verifier whose caller acts on accepted commands only later
    (``defer_sync``) ``stage``s each nonce (memory only) and writes them all with one
    ``write_staged`` before the first of their commands takes effect; a rewrite takes the staged
    nonces along (they are live ones). Staged nonces that leave the window first (a trainer
    stalled while commands keep coming) are dropped and the file rewritten with the floor that
    covers them (``forget_staged``), so the staged records are bounded like the rest.

    ``append``, ``stage``, ``write_staged`` and ``compact`` are called under the verifier's
    lock; ``sync`` from any thread.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: str = "fsync",
        compact_slack: int = LEDGER_COMPACT_SLACK,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        compact_slack = check_positive_int("compact_slack", compact_slack)
        self.path = Path(path).expanduser()
        self.durability = durability
        self.compact_slack = compact_slack
        self.broken = False  # an append or sync failed: the next record rewrites the file first
        self._file: io.FileIO | None = None  # append-only; a file object so it closes on GC
        self._lines = 0
        self._last = 0  # sequence number of the last record taken (written or staged)
        self._written = 0  # every record up to this one is in the OS (written)
        self._synced = 0  # every record up to this one is on disk
        self._staged: list[tuple[float, str]] = []  # taken by ``stage``, not written yet
        self._rewrite_due = False  # ``forget_staged`` dropped records: the floor must cover them
        self._sync_lock = fork_safe(threading.Lock())
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._acquire()
        # A rewrite interrupted by a crash leaves its temporary file; ours to remove (locked).
        remove_stale_temporaries_of(self.path, older_than_s=None)

    def _acquire(self) -> io.FileIO:
        lock_file = lock_exclusive(self.path.with_name(lock_name(self.path)))
        if lock_file is None:
            raise RuntimeError(
                f"nonce ledger {self.path} is held by another live trainer (another process of "
                "this run, or a second manager in this one); give each trainer, each rank "
                "included, its own run_id (a nonce_ledger path of its own is not enough: both "
                "would still write the run's checkpoints, where the second is refused too)"
            )
        return lock_file

    @property
    def lines(self) -> int:
        """Records in the file now (the header excluded)."""
        return self._lines

    def read(self) -> tuple[list[tuple[float, str]], float]:
        """Every ``(timestamp, nonce)`` record in the file and the newest floor (-inf: none).

        A line that does not parse or fails its CRC is skipped, with one warning for all. A
        file that is not a ledger (no header and not one record: a path that names another
        file), a ledger of another format version (a newer Kasmina's), a file that is not a
        regular file (a FIFO would block the read for good) or is larger than
        :data:`MAX_LEDGER_BYTES` raises ``ValueError``, since the ledger's next compaction
        would overwrite it.
        """
        try:
            data, _ = read_regular_file(self.path, MAX_LEDGER_BYTES, what="nonce ledger")
        except FileNotFoundError:
            return [], -math.inf
        if data.startswith(_LEDGER_HEADER[:23]) and not data.startswith(_LEDGER_HEADER[:26]):
            raise ValueError(  # a newer Kasmina's: its records would read as damaged, and go
                f"{self.path} is a nonce ledger of another format "
                f"({data[23:40].split(b':')[0].decode('ascii', 'replace')!r}; this Kasmina "
                "reads v1); refusing to rewrite it, which would forget its nonces: run the "
                "Kasmina that wrote it, or point nonce_ledger_path at a new file"
            )
        if (
            data
            and not data.startswith(_LEDGER_HEADER[:22])
            and not any(_parse_ledger_line(line) for line in data.split(b"\n") if line)
        ):
            raise ValueError(
                f"{self.path} is not a kasmina nonce ledger (no header, no record); refusing to "
                "overwrite it: point nonce_ledger_path at a new file"
            )
        entries: list[tuple[float, str]] = []
        floor = -math.inf
        skipped = 0
        for line in data.split(b"\n"):
            if not line or line.startswith(b"#"):
                continue
            record = _parse_ledger_line(line)
            if record is None:
                skipped += 1
            elif record[0] == "F":
                floor = max(floor, record[1])
            else:
                entries.append((record[1], record[2]))
        if skipped:
            logger.warning(
                "nonce ledger %s: skipped %d damaged line(s) (a crash mid-write leaves one at "
                "the end); the other %d record(s) were read",
                self.path,
                skipped,
                len(entries),
            )
        return entries, floor

    def _open_file(self) -> io.FileIO:
        """The file records are appended to; ``OSError`` when closed, or in a forked child
        (``locks.released``: the parent's ledger is not the child's to write)."""
        file = self._file
        if file is None or released(self._lock_file):
            raise OSError(f"nonce ledger {self.path} is not open (closed, or a forked child's)")
        return file

    def append(self, nonce: str, timestamp: float) -> int:
        """Write one accepted nonce (one ``write``: in the OS on return); its sequence number.
        Records staged before it are written with it, in order."""
        file = self._open_file()
        line = _ledger_line("N", timestamp, nonce)
        if self._staged:
            line = self._staged_lines() + line
        if file.write(line) != len(line):
            raise OSError(f"short write to nonce ledger {self.path}")
        self._staged.clear()
        self._lines += 1
        seq = self._last = self._written = self._last + 1
        return seq

    def stage(self, nonce: str, timestamp: float) -> int:
        """Take one accepted nonce to be written by the next ``write_staged`` (or ``append``,
        or rewrite); its sequence number. No I/O: for a verifier whose caller acts on accepted
        commands only after ``write_staged`` and ``sync`` (``CommandVerifier(defer_sync=True)``
        and its ``make_durable``)."""
        self._open_file()
        self._staged.append((timestamp, nonce))
        self._lines += 1
        self._last += 1
        return self._last

    @property
    def staged(self) -> int:
        """Records taken by ``stage`` and not written yet."""
        return len(self._staged)

    def forget_staged(self, live: Container[str]) -> None:
        """Drop the staged records of nonces no longer ``live``: they left the freshness window
        before a safe point wrote them (a trainer that stalls while commands keep arriving),
        and would otherwise grow memory with the stall. The next record rewrites the file
        (``needs_compaction``), whose floor then covers them: they are stale."""
        kept = [(timestamp, nonce) for timestamp, nonce in self._staged if nonce in live]
        self._lines -= len(self._staged) - len(kept)
        self._staged = kept
        self._rewrite_due = True

    def write_staged(self) -> int:
        """Write every staged record (one ``write``); the sequence number now in the OS."""
        if self._staged:
            file = self._open_file()
            data = self._staged_lines()
            if file.write(data) != len(data):
                raise OSError(f"short write to nonce ledger {self.path}")
            self._staged.clear()
            self._written = self._last
        return self._written

    def _staged_lines(self) -> bytes:
        return b"".join(_ledger_line("N", timestamp, nonce) for timestamp, nonce in self._staged)

    def sync(self, seq: int) -> None:
        """Return once record ``seq`` is durable (``"fsync"``): one fdatasync covers every
        record written before it started, so concurrent callers mostly find theirs done. A
        staged record must be written (``write_staged``) first."""
        if seq > self._written:
            raise OSError(f"nonce ledger {self.path}: record {seq} is staged, not written")
        if self.durability != "fsync" or self._synced >= seq:
            return
        with self._sync_lock:
            if self._synced >= seq:
                return
            file = self._open_file()
            if self.broken:
                # After a failed fdatasync the kernel may have dropped the dirty pages and a
                # second one can succeed without them: nothing counts as durable until the
                # file has been rewritten.
                raise OSError(f"nonce ledger {self.path} failed and is not rewritten yet")
            target = self._written
            try:
                _datasync(file.fileno())
            except OSError as exc:
                self.mark_broken(exc)
                raise
            self._synced = max(self._synced, target)

    def needs_compaction(self, live: int) -> bool:
        grown = self._lines > 2 * live + self.compact_slack
        return self.broken or self._file is None or self._rewrite_due or grown

    def compact(self, live: Iterable[tuple[str, float]], floor: float) -> None:
        """Atomically replace the file with ``live`` ``(nonce, timestamp)`` records and the
        floor, durable on return, and append to the new file from now on."""
        if self._closed or released(self._lock_file):
            raise OSError(f"nonce ledger {self.path} is closed (or a forked child's)")
        chunks = [_LEDGER_HEADER]
        if math.isfinite(floor):
            chunks.append(_ledger_line("F", floor, ""))
        chunks.extend(_ledger_line("N", timestamp, nonce) for nonce, timestamp in live)
        stem = temporary_stem(self.path.parent, self.path.name)  # cut as the clean-up cuts it
        tmp = self.path.with_name(f".{stem}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, b"".join(chunks))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            _fsync_directory(self.path.parent)
            new_file = io.FileIO(self.path, "a")
        except BaseException:
            self.broken = True
            tmp.unlink(missing_ok=True)
            raise
        with self._sync_lock:
            old, self._file = self._file, new_file
            self._lines = len(chunks) - 1
            self._staged.clear()  # staged nonces are live ones: in the new file too
            self._rewrite_due = False
            # Whatever the old file held or was staged is in the new one, on disk.
            self._written = self._synced = self._last
        if old is not None:
            old.close()
        if self.broken:
            logger.warning("nonce ledger %s recovered (rewritten)", self.path)
        self.broken = False

    def mark_broken(self, exc: BaseException) -> None:
        """An append or sync failed: log it once, and rewrite the file before the next record.
        A ledger closed on purpose refuses every record without being broken."""
        if self._closed:
            return
        if not self.broken:
            logger.error(
                "nonce ledger %s failed (%s: %s): commands are refused until it can be written",
                self.path,
                type(exc).__name__,
                exc,
            )
        self.broken = True

    def close(self) -> None:
        """Close the file and release the lock; recording afterwards fails (fail closed)."""
        with self._sync_lock:
            self._closed = True
            file, self._file = self._file, None
        if file is not None:
            file.close()
        self._lock_file.close()

    def __repr__(self) -> str:
        return f"NonceLedger({str(self.path)!r}, durability={self.durability!r})"
