"""HMAC authentication of Leyline commands (docs/design.md §5).

A command is signed with HMAC-SHA256 over ``COMMAND_SIGNATURE_TAG`` followed by
``SerializeToString(deterministic=True)`` of the whole ``AdaptationCommand`` with
``metadata.signature`` cleared. The tag names the purpose, so an HMAC made for anything else
under the same key never verifies as a command. Keys live in a ``Keyring``
(by ``key_id``) loaded from configuration, an environment variable or a file, never from code.

The verifier checks, in order: the envelope is present, the signature (constant-time), the
freshness of the timestamp, and that the nonce is unseen. A nonce is recorded only after the
signature and freshness pass, and is forgotten once its timestamp leaves the freshness window
(it would be rejected as stale from then on), so the ledger holds at most
``rate x 2 x freshness_s`` entries however many commands arrive.

With a ``NonceLedger`` the accepted nonces are also appended to a file in the run's state
directory before their commands count as accepted, and read back when a verifier starts, so a
restarted trainer refuses a command that an earlier process of the same run already accepted
(docs/design.md §5, "Replay across restarts").
"""

from __future__ import annotations

import heapq
import hmac
import io
import logging
import math
import os
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

from kasmina.leyline import AdaptationCommand
from kasmina.utils.keyring import Keyring

try:
    import fcntl
except ImportError:  # not POSIX: the ledger cannot lock its file
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "COMMAND_SIGNATURE_TAG",
    "CommandVerifier",
    "DURABILITY_MODES",
    "LEDGER_FILE_NAME",
    "MAX_FRESHNESS_S",
    "NonceLedger",
    "compute_signature",
    "sign_command",
]

MAX_NONCE_CHARS = 256
# Prefixed to the serialised command before the HMAC, when signing and when verifying.
COMMAND_SIGNATURE_TAG = b"kasmina-leyline-command-v1\0"


def compute_signature(command: AdaptationCommand, keyring: Keyring, key_id: str) -> bytes | None:
    """HMAC over the deterministic serialisation with the signature cleared (None: unknown key).

    The signature field is cleared only for the duration of the serialisation and restored
    afterwards, so the caller's message is left as it was (not safe to share across threads
    while it runs).
    """
    if key_id not in keyring:
        return None
    metadata = command.metadata
    signature = metadata.signature
    metadata.signature = b""
    try:
        payload = command.SerializeToString(deterministic=True)
    finally:
        metadata.signature = signature
    return keyring.digest(key_id, COMMAND_SIGNATURE_TAG + payload)


def sign_command(
    command: AdaptationCommand,
    keyring: Keyring,
    key_id: str,
    *,
    nonce: str | None = None,
    timestamp: float | None = None,
) -> AdaptationCommand:
    """Fill ``command.metadata`` (key id, nonce, timestamp, signature) in place and return it."""
    if key_id not in keyring:
        raise KeyError(f"no key {key_id!r} in the keyring")
    metadata = command.metadata
    metadata.key_id = key_id
    metadata.nonce = secrets.token_hex(16) if nonce is None else nonce
    now = time.time() if timestamp is None else timestamp
    seconds, nanos = divmod(round(now * 1e9), 1_000_000_000)
    metadata.timestamp.seconds = seconds
    metadata.timestamp.nanos = nanos
    metadata.signature = b""
    metadata.signature = compute_signature(command, keyring, key_id) or b""
    return command


MAX_FRESHNESS_S = 3600.0  # a longer window only widens what a captured command can be replayed in
LEDGER_FILE_NAME = "nonces.log"
# "fsync": each accepted nonce reaches the disk (fdatasync) before its command is accepted, so
# it survives a power loss; concurrent arrivals share one fdatasync. "flush": it reaches the
# operating system (one write), which survives the process crashing or being killed, not the
# machine losing power.
DURABILITY_MODES = ("fsync", "flush")
# Lines the ledger file may hold beyond twice its live nonces before it is rewritten: each
# rewrite (O(live nonces)) is paid for by at least this many appends.
LEDGER_COMPACT_SLACK = 4096
_LEDGER_HEADER = (
    b"# kasmina nonce ledger v1: 'N <timestamp> <nonce hex> <crc32>' | 'F <floor> - <crc32>'\n"
)


def _ledger_line(kind: str, timestamp: float, nonce: str) -> bytes:
    """One record: the CRC-32 of the rest of the line lets a torn or damaged line be skipped."""
    body = f"{kind} {timestamp!r} {nonce.encode('utf-8').hex() if nonce else '-'}".encode("ascii")
    return b"%s %08x\n" % (body, zlib.crc32(body))


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

    ``append`` and ``compact`` are called under the verifier's lock; ``sync`` from any thread.
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
        if isinstance(compact_slack, bool) or not isinstance(compact_slack, int):
            raise TypeError(f"compact_slack must be an int, got {compact_slack!r}")
        if compact_slack < 1:
            raise ValueError(f"compact_slack must be an int >= 1, got {compact_slack}")
        self.path = Path(path).expanduser()
        self.durability = durability
        self.compact_slack = compact_slack
        self.broken = False  # an append or sync failed: the next record rewrites the file first
        self._file: io.FileIO | None = None  # append-only; a file object so it closes on GC
        self._lines = 0
        self._written = 0  # sequence number of the last record written
        self._synced = 0  # every record up to this one is on disk
        self._sync_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._acquire()
        # A rewrite interrupted by a crash leaves its temporary file; ours to remove (locked).
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)

    def _acquire(self) -> io.FileIO:
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_file = io.FileIO(lock_path, "a")
        if fcntl is None:  # no advisory locks on this platform: one owner is the caller's duty
            return lock_file
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise RuntimeError(
                f"nonce ledger {self.path} is held by another live trainer (another process of "
                "this run, or a second manager in this one); give each trainer its own run_id "
                "or nonce_ledger path"
            ) from None
        return lock_file

    @property
    def lines(self) -> int:
        """Records in the file now (the header excluded)."""
        return self._lines

    def read(self) -> tuple[list[tuple[float, str]], float]:
        """Every ``(timestamp, nonce)`` record in the file and the newest floor (-inf: none).

        A line that does not parse or fails its CRC is skipped, with one warning for all.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], -math.inf
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

    def append(self, nonce: str, timestamp: float) -> int:
        """Write one accepted nonce (one ``write``: in the OS on return); its sequence number."""
        file = self._file
        if file is None:
            raise OSError(f"nonce ledger {self.path} is not open")
        line = _ledger_line("N", timestamp, nonce)
        if file.write(line) != len(line):
            raise OSError(f"short write to nonce ledger {self.path}")
        self._lines += 1
        self._written += 1
        return self._written

    def sync(self, seq: int) -> None:
        """Return once record ``seq`` is durable (``"fsync"``): one fdatasync covers every
        record written before it started, so concurrent callers mostly find theirs done."""
        if self.durability != "fsync" or self._synced >= seq:
            return
        with self._sync_lock:
            if self._synced >= seq:
                return
            file = self._file
            if file is None:
                raise OSError(f"nonce ledger {self.path} is not open")
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
        return self.broken or self._file is None or self._lines > 2 * live + self.compact_slack

    def compact(self, live: Iterable[tuple[str, float]], floor: float) -> None:
        """Atomically replace the file with ``live`` ``(nonce, timestamp)`` records and the
        floor, durable on return, and append to the new file from now on."""
        if self._closed:
            raise OSError(f"nonce ledger {self.path} is closed")
        chunks = [_LEDGER_HEADER]
        if math.isfinite(floor):
            chunks.append(_ledger_line("F", floor, ""))
        chunks.extend(_ledger_line("N", timestamp, nonce) for nonce, timestamp in live)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
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
            self._synced = self._written  # whatever the old file held is in the new one
        if old is not None:
            old.close()
        if self.broken:
            logger.warning("nonce ledger %s recovered (rewritten)", self.path)
        self.broken = False

    def mark_broken(self, exc: BaseException) -> None:
        """An append or sync failed: log it once, and rewrite the file before the next record."""
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


class CommandVerifier:
    """Checks signature, freshness and replay of commands; keeps a bounded nonce ledger.

    Reasons returned on rejection: ``missing_metadata``, ``missing_signature``,
    ``missing_nonce``, ``bad_nonce``, ``untrusted_key_id``, ``unknown_key_id``,
    ``bad_signature``, ``stale``, ``future``, ``replay``, ``ledger_error``. ``"ok"`` on success.

    ``key_ids`` (optional) are the only key ids whose signatures count, so that a keyring file
    shared with other controllers or tools lends this trainer only the keys meant for it.
    ``ledger`` (optional) makes the nonce ledger durable across restarts: its records are read
    now, and every accepted nonce is written to it before ``verify`` returns ok; if it cannot be
    written the command is refused (``ledger_error``), since accepting it would leave a replay
    open after the next restart.

    ``defer_sync``: for a caller that acts on accepted commands later (the kernel manager
    applies them at its next safe point), ``verify`` only writes the nonce and the caller calls
    ``make_durable()`` before acting. A command that took no effect before a crash can be sent
    again after it; what must never happen, a command taking effect twice, still cannot. The
    command path then pays one ``write`` instead of a disk flush per command, and the safe point
    pays one ``fdatasync`` for every command it applies.
    """

    def __init__(
        self,
        keyring: Keyring,
        freshness_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        *,
        key_ids: Collection[str] | None = None,
        ledger: NonceLedger | None = None,
        defer_sync: bool = False,
    ) -> None:
        if isinstance(freshness_s, bool) or not isinstance(freshness_s, (int, float)):
            raise TypeError(f"freshness_s must be a number of seconds, got {freshness_s!r}")
        if not 0 < freshness_s <= MAX_FRESHNESS_S:
            raise ValueError(
                f"freshness_s must be in (0, {MAX_FRESHNESS_S:g}] seconds, got {freshness_s!r}"
            )
        self.keyring = keyring
        self.freshness_s = float(freshness_s)
        self.key_ids = None if key_ids is None else _key_id_set(key_ids)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # nonce -> command timestamp
        self._expiry: list[tuple[float, str]] = []  # min-heap of (timestamp, nonce)
        # The newest timestamp of any forgotten nonce. Commands at or below it are stale even
        # if the clock later steps backwards, so a forgotten nonce can never be replayed.
        self._floor = float("-inf")
        self._ledger = ledger
        self.defer_sync = bool(defer_sync)
        self._unsynced = 0  # sequence number of the newest record written but not yet synced
        if ledger is not None:
            self._restore(ledger)

    @property
    def ledger_size(self) -> int:
        return len(self._seen)

    @property
    def ledger(self) -> NonceLedger | None:
        """The durable ledger, if any."""
        return self._ledger

    def close(self) -> None:
        """Close the durable ledger (if any): from now on every command is refused."""
        if self._ledger is not None:
            self._ledger.close()

    def _restore(self, ledger: NonceLedger) -> None:
        """Load the ledger's records: nonces still inside the window are seen, older ones only
        raise the floor; then rewrite the file with just those (bounded from the start)."""
        entries, floor = ledger.read()
        cutoff = self._clock() - self.freshness_s
        seen = self._seen
        for timestamp, nonce in entries:
            if timestamp < cutoff:
                floor = max(floor, timestamp)
            elif timestamp > seen.get(nonce, -math.inf):
                seen[nonce] = timestamp
        self._expiry = [(timestamp, nonce) for nonce, timestamp in seen.items()]
        heapq.heapify(self._expiry)
        self._floor = floor
        ledger.compact(seen.items(), floor)
        logger.info(
            "nonce ledger %s: %d nonce(s) inside the %gs window restored",
            ledger.path,
            len(seen),
            self.freshness_s,
        )

    def now(self) -> float:
        """The verifier's clock: the time freshness is judged against on arrival (a receiving
        rank records it with the command, so the other ranks can judge against the same)."""
        return self._clock()

    def verify(self, command: AdaptationCommand, *, record_nonce: bool = True) -> tuple[bool, str]:
        """``(ok, reason)``. With ``record_nonce=False`` the command is checked (a replay is
        still refused) but its nonce is not used up, so it can be executed afterwards."""
        reason = self._authentic(command)
        if reason:
            return False, reason
        metadata = command.metadata
        ts = metadata.timestamp
        timestamp = ts.seconds + ts.nanos * 1e-9
        now = self._clock()
        return self._admit(metadata.nonce, timestamp, now, now, record_nonce)

    def verify_relayed(
        self, command: AdaptationCommand, received_at: float, *, record_nonce: bool = True
    ) -> tuple[bool, str]:
        """``verify`` for a command another rank of the same job received and verified at
        ``received_at`` (its verifier's ``now()``), then relayed to this rank.

        Why: the ranks apply a command together at their next safe point, which may come long
        after it arrived (an epoch can outlast the freshness window). Freshness was judged by
        the receiving rank when the command arrived, so here it is judged against
        ``received_at``, not this clock; everything else is checked as on arrival: envelope,
        signature (so a rank obeys only what the controller signed, whatever a peer sends),
        key id, and that this rank has not used the nonce (it is recorded here too, so the
        same command sent to this rank directly later is a replay). ``received_at`` more than
        the window ahead of this clock is refused as ``future``: the ranks' clocks disagree by
        more than the window, or the peer is wrong.
        """
        reason = self._authentic(command)
        if reason:
            return False, reason
        if not math.isfinite(received_at):
            return False, "stale"
        now = self._clock()
        if received_at > now + self.freshness_s:
            return False, "future"
        metadata = command.metadata
        ts = metadata.timestamp
        timestamp = ts.seconds + ts.nanos * 1e-9
        # Nonces are forgotten only up to the receive time, so a batch of relayed commands
        # applied late does not age out the ones it has not reached yet.
        return self._admit(
            metadata.nonce, timestamp, received_at, min(now, received_at), record_nonce
        )

    def _authentic(self, command: AdaptationCommand) -> str:
        """The reason ``command`` is not a well-formed command signed by a trusted key ("")."""
        if not command.HasField("metadata"):
            return "missing_metadata"
        metadata = command.metadata
        signature = metadata.signature
        if not signature:
            return "missing_signature"
        nonce = metadata.nonce
        if not nonce:
            return "missing_nonce"
        if len(nonce) > MAX_NONCE_CHARS:
            return "bad_nonce"
        if self.key_ids is not None and metadata.key_id not in self.key_ids:
            return "untrusted_key_id"
        expected = compute_signature(command, self.keyring, metadata.key_id)
        if expected is None:
            return "unknown_key_id"
        if not hmac.compare_digest(expected, signature):
            return "bad_signature"
        return ""

    def _admit(
        self, nonce: str, timestamp: float, judged_at: float, prune_at: float, record_nonce: bool
    ) -> tuple[bool, str]:
        """Freshness of ``timestamp`` at ``judged_at``, then the nonce unseen, then recorded
        (with the ledger, written before this answers ok)."""
        with self._lock:
            self._prune(prune_at)
            if timestamp < judged_at - self.freshness_s or timestamp <= self._floor:
                return False, "stale"
            if timestamp > judged_at + self.freshness_s:
                return False, "future"
            if nonce in self._seen:
                return False, "replay"
            if not record_nonce:
                return True, "ok"
            self._seen[nonce] = timestamp
            heapq.heappush(self._expiry, (timestamp, nonce))
            ledger = self._ledger
            if ledger is None:
                return True, "ok"
            # The nonce stays seen even if it cannot be written: refused either way.
            try:
                if ledger.needs_compaction(len(self._seen)):
                    ledger.compact(self._seen.items(), self._floor)  # includes this nonce
                    seq = 0
                else:
                    seq = ledger.append(nonce, timestamp)
            except OSError as exc:
                ledger.mark_broken(exc)
                return False, "ledger_error"
            if self.defer_sync:
                self._unsynced = max(self._unsynced, seq)
                return True, "ok"
        try:  # outside the lock: threads arriving together share one fdatasync
            ledger.sync(seq)
        except OSError as exc:
            ledger.mark_broken(exc)
            return False, "ledger_error"
        return True, "ok"

    def make_durable(self) -> None:
        """Return once every nonce accepted so far is durable (``defer_sync``); raises
        ``OSError`` when the ledger cannot make it so (then act on none of them)."""
        ledger = self._ledger
        if ledger is None:
            return
        with self._lock:
            seq, self._unsynced = self._unsynced, 0
        if seq == 0:
            return
        try:
            ledger.sync(seq)
        except OSError as exc:
            ledger.mark_broken(exc)
            raise

    def _prune(self, now: float) -> None:
        """Forget nonces whose timestamp has left the window (they can only be stale now)."""
        cutoff = now - self.freshness_s
        expiry = self._expiry
        while expiry and expiry[0][0] < cutoff:
            timestamp, nonce = heapq.heappop(expiry)
            del self._seen[nonce]
            self._floor = timestamp  # pops come in increasing timestamp order


def _key_id_set(key_ids: Collection[str]) -> frozenset[str]:
    """Validated key ids; a bare string is refused (it would silently mean its characters)."""
    if isinstance(key_ids, (str, bytes)):
        raise TypeError(
            f"key_ids must be a collection of key ids, not the single string {key_ids!r} "
            f"(write ({key_ids!r},) for one id)"
        )
    ids = tuple(key_ids)
    if not ids or not all(isinstance(k, str) and k for k in ids):
        raise ValueError(f"key_ids must be non-empty strings (at least one), got {ids!r}")
    return frozenset(ids)
