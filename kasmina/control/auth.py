"""HMAC authentication of Leyline commands (docs/design.md §5).

A command is signed with HMAC-SHA256 over ``COMMAND_SIGNATURE_TAG`` followed by
``SerializeToString(deterministic=True)`` of the whole ``AdaptationCommand`` with
``metadata.signature`` cleared. The tag names the purpose, so an HMAC made for anything else
under the same key never verifies as a command. Keys live in a ``Keyring``
(by ``key_id``) loaded from configuration, an environment variable or a file, never from code.

The verifier checks, in order: the envelope is present, the signature (constant-time), the
freshness of the timestamp, that the nonce is unseen, and that no command accepted inside the
window carried the same ``command_id``. A nonce (and its command's id) is recorded only after the
signature and freshness pass, and is forgotten once its timestamp leaves the freshness window
(it would be rejected as stale from then on), so the ledger holds at most
``rate x 2 x freshness_s`` entries however many commands arrive.

The command id is an idempotency key: a controller that saw no outcome of a command and sends it
again, signed anew (a new nonce and timestamp, or it would be a replay), keeps its id, and inside
the window the retry is refused as ``duplicate_command`` instead of acting twice (a second
ADVANCE would move its seed on by another stage). An id counts once whatever became of its
command, so a new command after a refusal takes a new id. Ids are kept in memory only: a
restarted trainer resumes from a checkpoint, which may predate the command.

With a ``NonceLedger`` the accepted nonces are also appended to a file in the run's state
directory before their commands can take effect, and read back when a verifier starts, so a
restarted trainer refuses a command that an earlier process of the same run already accepted
(docs/design.md §5, "Replay across restarts").
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable
from numbers import Real
from typing import Any, NamedTuple

from kasmina.control.commands import MAX_ID_CHARS
from kasmina.control.ledger import MAX_LIVE_NONCES, NonceLedger
from kasmina.leyline import AdaptationCommand
from kasmina.utils.keyring import Keyring, checked_keyring, command_keyring
from kasmina.utils.locks import fork_safe

logger = logging.getLogger(__name__)

__all__ = [
    "COMMAND_SIGNATURE_TAG",
    "CommandVerifier",
    "MAX_FRESHNESS_S",
    "compute_signature",
    "sign_command",
]

MAX_NONCE_CHARS = 256
# Prefixed to the serialised command before the HMAC, when signing and when verifying.
COMMAND_SIGNATURE_TAG = b"kasmina-leyline-command-v1\0"
_SHA256_BLOCK = 64
_compare_digest = hmac.compare_digest
_heappush = heapq.heappush


class _CommandMac(NamedTuple):
    """HMAC-SHA256 (RFC 2104) under one key with the key schedule and the purpose tag absorbed
    once: ``inner`` is SHA-256 after ``key ^ ipad`` and the prefix, ``outer`` after ``key ^
    opad``. A signature then costs two ``sha256`` copies, updates and digests.

    Why not ``hmac.new(...).copy()``: each of its calls goes through ``hmac.HMAC``'s Python
    wrapper, and on the command path the wrapper is most of the HMAC's cost. The result is the
    same HMAC (``tests/control/test_auth.py`` checks it against ``hmac`` for short, block-sized
    and long keys).
    """

    inner: Any  # hashlib's SHA-256 objects (their type is not public)
    outer: Any

    @classmethod
    def prepare(cls, key: bytes, prefix: bytes) -> _CommandMac:
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        inner.update(prefix)
        return cls(inner, hashlib.sha256(bytes(b ^ 0x5C for b in key)))

    def digest(self, message: bytes) -> bytes:
        """HMAC of the prefix followed by ``message``."""
        inner = self.inner.copy()
        inner.update(message)
        outer = self.outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def compute_signature(command: AdaptationCommand, keyring: Keyring, key_id: str) -> bytes | None:
    """HMAC over the deterministic serialisation with the signature cleared (None: unknown key).

    The signature field is cleared only for the duration of the serialisation and restored
    afterwards, so the caller's message is left as it was (not safe to share across threads
    while it runs).
    """
    _check_signing_arguments(command, keyring)
    return _signature(command, keyring, key_id)


def _signature(command: AdaptationCommand, keyring: Keyring, key_id: str) -> bytes | None:
    """:func:`compute_signature` of arguments already checked."""
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
    """Fill ``command.metadata`` (key id, nonce, timestamp, signature) in place and return it.

    ``timestamp``: seconds since the epoch (default: now). Arguments are checked before the
    command is touched; a wrong one is a TypeError or ValueError naming it."""
    _check_signing_arguments(command, keyring)
    if key_id not in keyring:
        raise KeyError(f"no key {key_id!r} in the keyring, which holds {list(keyring.key_ids)}")
    if nonce is not None and not isinstance(nonce, str):
        raise TypeError(
            f"nonce must be a str or None (a fresh one), got {type(nonce).__name__} {nonce!r:.40}"
        )
    if nonce is not None and not 0 < len(nonce) <= MAX_NONCE_CHARS:  # what the trainer refuses
        raise ValueError(f"nonce must be 1 to {MAX_NONCE_CHARS} characters, got {nonce!r:.40}")
    try:  # a lone surrogate cannot go on the wire: it failed with the key id already written
        f"{key_id}{nonce or ''}".encode()
    except UnicodeEncodeError:
        raise ValueError(
            f"nonce {nonce!r:.40} or key_id {key_id!r:.40} is not UTF-8 text"
        ) from None
    now = time.time() if timestamp is None else timestamp
    if isinstance(now, bool) or not isinstance(now, Real):
        raise TypeError(
            f"timestamp must be seconds since the epoch (a number) or None (now), "
            f"got {type(now).__name__} {now!r:.40}"
        )
    if isinstance(now, float) and not math.isfinite(now):
        raise ValueError(f"timestamp must be finite seconds since the epoch, got {now!r}")
    # What a protobuf Timestamp holds, checked before it is scaled (1e300 overflowed there).
    if not _TIMESTAMP_MIN_S <= now <= _TIMESTAMP_MAX_S:
        raise ValueError(f"timestamp must be within the years 1 to 9999, got {now!r:.40}")
    seconds, nanos = divmod(round(now * 1e9), 1_000_000_000)
    metadata = command.metadata
    metadata.key_id = key_id
    metadata.nonce = secrets.token_hex(16) if nonce is None else nonce
    metadata.timestamp.seconds = seconds
    metadata.timestamp.nanos = nanos
    metadata.signature = b""
    metadata.signature = _signature(command, keyring, key_id) or b""
    return command


# 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z, the range of google.protobuf.Timestamp.
_TIMESTAMP_MIN_S, _TIMESTAMP_MAX_S = -62_135_596_800, 253_402_300_799
MAX_FRESHNESS_S = 3600.0  # a longer window only widens what a captured command can be replayed in


class CommandVerifier:
    """Checks signature, freshness and replay of commands; keeps a bounded nonce ledger.

    Reasons returned on rejection: ``missing_metadata``, ``missing_signature``,
    ``missing_nonce``, ``bad_nonce``, ``untrusted_key_id``, ``unknown_key_id``,
    ``bad_signature``, ``stale``, ``future``, ``replay``, ``duplicate_command``,
    ``too_many_commands`` (``MAX_LIVE_NONCES`` accepted in the freshness window already),
    ``ledger_error``. ``"ok"`` on success.

    ``key_ids`` (optional) are the only key ids whose signatures count, so that a keyring file
    shared with other controllers or tools lends this trainer only the keys meant for it.
    ``ledger`` (optional) makes the nonce ledger durable across restarts: its records are read
    now, and every accepted nonce is written to it before ``verify`` returns ok (with
    ``defer_sync``, before ``make_durable`` returns); if it cannot be written the command is
    refused (``ledger_error``, or ``make_durable`` raises), since acting on it would leave a
    replay open after the next restart.

    ``defer_sync``: for a caller that acts on accepted commands later (the kernel manager
    applies them at its next safe point), ``verify`` records the nonce in memory and stages it
    for the ledger (a replay is refused at once), and the caller calls ``make_durable()`` before
    acting, which writes every staged nonce and syncs them. A command that took no effect before
    a crash can be sent again after it; what must never happen, a command taking effect twice,
    still cannot. The command path then pays no system call at all, and the safe point one
    ``write`` and one ``fdatasync`` for every command it applies.
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
        command_keyring(keyring)  # an empty one: every command refused, nothing said
        if isinstance(freshness_s, bool) or not isinstance(freshness_s, (int, float)):
            raise TypeError(f"freshness_s must be a number of seconds, got {freshness_s!r}")
        if not 0 < freshness_s <= MAX_FRESHNESS_S:
            raise ValueError(
                f"freshness_s must be in (0, {MAX_FRESHNESS_S:g}] seconds, got {freshness_s!r}"
            )
        self._keyring = keyring
        self.freshness_s = float(freshness_s)
        self.key_ids = None if key_ids is None else _key_id_set(key_ids)
        missing = sorted((self.key_ids or set()) - set(keyring.key_ids))
        if missing:  # a typo would refuse every command as signed by an untrusted key
            raise ValueError(
                f"command key id(s) {missing} are not in the keyring, which holds "
                f"{sorted(keyring.key_ids)}: no command signed with them could be accepted"
            )
        # One prepared HMAC per key whose signatures count (the keyring is immutable).
        self._macs: dict[str, _CommandMac] = {}
        for key_id in keyring.key_ids:
            key = keyring.get(key_id)
            if key is not None and (self.key_ids is None or key_id in self.key_ids):
                self._macs[key_id] = _CommandMac.prepare(key, COMMAND_SIGNATURE_TAG)
        self._clock = clock
        # Free in a forked child (``fork_safe``): a nonce a controller thread was recording at
        # the fork may be half recorded there (seen, its expiry or command id not yet kept):
        # still a replay to the child, only kept until the child ends.
        self._lock = fork_safe(threading.Lock())
        self._seen: dict[str, float] = {}  # nonce -> command timestamp
        self._expiry: list[tuple[float, str]] = []  # min-heap of (timestamp, nonce)
        # Accepted commands' ids -> their timestamps, and their min-heap: forgotten with their
        # nonces (module docstring: the id is an idempotency key inside the window).
        self._ids: dict[str, float] = {}
        self._id_expiry: list[tuple[float, str]] = []
        # The newest timestamp of any forgotten nonce. Commands at or below it are stale even
        # if the clock later steps backwards, so a forgotten nonce can never be replayed.
        self._floor = float("-inf")
        self._ledger = ledger
        self.defer_sync = bool(defer_sync)
        self._unsynced = 0  # sequence number of the newest record written but not yet synced
        if ledger is not None:
            self._restore(ledger)

    @property
    def keyring(self) -> Keyring:
        """The command keys (fixed at construction: the verifier prepares one HMAC per key)."""
        return self._keyring

    @property
    def ledger_size(self) -> int:
        return len(self._seen)

    @property
    def ledger(self) -> NonceLedger | None:
        """The durable ledger, if any."""
        return self._ledger

    def close(self) -> None:
        """Close the durable ledger (if any): from now on every command is refused. The nonces
        still staged (``defer_sync``) are written first: a command accepted but dropped at
        close (a manager closing before its next safe point) stays a replay to the run's next
        process. Under the lock its records are written under, so a write in flight (a safe
        point's ``make_durable`` on the training thread) completes first, never on a closed
        file. A ledger that cannot take them is logged, and closed all the same."""
        if self._ledger is None:
            return
        try:
            self.make_durable()
        except OSError as exc:
            logger.error("nonce ledger: the nonces staged at close were not written: %s", exc)
        finally:
            with self._lock:
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
        reason = self.check(command, record_nonce=record_nonce)
        return (True, "ok") if not reason else (False, reason)

    def check(
        self,
        command: AdaptationCommand,
        received_at: float | None = None,
        *,
        record_nonce: bool = True,
        owned: bool = False,
    ) -> str:
        """``verify`` (``received_at`` None) or ``verify_relayed``, answering ``""`` when the
        command passes and its rejection reason otherwise: the handler's form, with no tuple.

        ``owned``: the caller parsed ``command`` itself and drops it after validation, so its
        signature field is left cleared rather than restored (one field write saved).

        The checks run in one function, in the order of docs/design.md §5: the envelope, the
        key id, the signature, freshness, then the nonce. The HMAC is computed over the purpose
        tag and the deterministic serialisation of the *parsed* message with its signature
        cleared, never over the bytes as received: those need not be canonical (fields in
        another order, map entries in another order, a submessage sent in two pieces are all
        legal encodings of one message), so re-serialising is what makes the bytes that were
        authenticated exactly the message that is then validated and obeyed.
        """
        metadata = command.metadata
        signature = metadata.signature
        if not signature:
            return "missing_signature" if command.HasField("metadata") else "missing_metadata"
        nonce = metadata.nonce
        if not nonce:
            return "missing_nonce"
        if len(nonce) > MAX_NONCE_CHARS:
            return "bad_nonce"
        key_id = metadata.key_id
        mac = self._macs.get(key_id)
        if mac is None:
            if self.key_ids is not None and key_id not in self.key_ids:
                return "untrusted_key_id"
            return "unknown_key_id"
        metadata.signature = b""
        if owned:
            payload = command.SerializeToString(deterministic=True)
        else:
            try:
                payload = command.SerializeToString(deterministic=True)
            finally:
                metadata.signature = signature
        inner = mac.inner.copy()  # mac.digest(payload), inline: this is the hot path
        inner.update(payload)
        outer = mac.outer.copy()
        outer.update(inner.digest())
        if not _compare_digest(outer.digest(), signature):
            return "bad_signature"

        ts = metadata.timestamp
        timestamp = ts.seconds + ts.nanos * 1e-9
        now = self._clock()
        freshness_s = self.freshness_s
        if received_at is None:
            judged_at = prune_at = now
        else:
            if not math.isfinite(received_at):
                return "stale"
            if received_at > now + freshness_s:
                return "future"
            # Nonces are forgotten only up to the receive time, so a batch of relayed commands
            # applied late does not age out the ones it has not reached yet.
            judged_at, prune_at = received_at, min(now, received_at)
        with self._lock:
            expiry = self._expiry
            if expiry and expiry[0][0] < prune_at - freshness_s:
                self._prune(prune_at)
            # Negated, so a clock that reads NaN refuses every command (NaN compares False).
            if not timestamp >= judged_at - freshness_s or timestamp <= self._floor:
                return "stale"
            if not timestamp <= judged_at + freshness_s:
                return "future"
            seen = self._seen
            if nonce in seen:
                return "replay"
            command_id = command.command_id  # "" is refused by validation (``bad_command_id``)
            if command_id in self._ids:
                return "duplicate_command"
            if len(seen) >= MAX_LIVE_NONCES:  # a bounded window: memory, and the ledger's file
                return "too_many_commands"  # also to a check that would not record the nonce
            if not record_nonce:
                return ""
            seen[nonce] = timestamp
            _heappush(expiry, (timestamp, nonce))
            ledger = self._ledger
            seq = 0 if ledger is None else self._write(ledger, nonce, timestamp)
            if seq < 0:  # refused, its nonce used up: the same id sent again is no duplicate
                return "ledger_error"
            # An id validation refuses (too long) is not kept: no later command can take it,
            # and a signer's 64 KiB ids would hold gigabytes over a full window of nonces.
            if command_id and len(command_id) <= MAX_ID_CHARS:
                self._ids[command_id] = timestamp
                _heappush(self._id_expiry, (timestamp, command_id))
            if ledger is None:
                return ""
            if self.defer_sync:
                if seq > self._unsynced:
                    self._unsynced = seq
                return ""
        if ledger.durability != "fsync":  # "flush": written is all it takes
            return ""
        try:  # outside the lock: threads arriving together share one fdatasync
            ledger.sync(seq)
        except OSError as exc:
            ledger.mark_broken(exc)
            with self._lock:  # refused: the same id sent again is no duplicate
                if command_id and self._ids.get(command_id) == timestamp:
                    del self._ids[command_id]
            return "ledger_error"
        return ""

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
        reason = self.check(command, received_at, record_nonce=record_nonce)
        return (True, "ok") if not reason else (False, reason)

    def _write(self, ledger: NonceLedger, nonce: str, timestamp: float) -> int:
        """Record an accepted nonce in the durable ledger (under ``_lock``): its sequence
        number (0 after a rewrite, which is durable), or -1 when it cannot be written. The
        nonce stays seen in memory either way: it is refused whether or not it was written.

        With ``defer_sync`` the record is only staged: ``make_durable`` writes and syncs every
        staged record before the caller acts on any of their commands, so arrival costs no
        system call (docs/design.md §5, "Cost"), and a file grown past its bound is rewritten
        there too, not here under the lock the safe point takes (only a broken ledger is
        rewritten on arrival: a failure already cost that safe point its commands)."""
        seen = self._seen
        try:
            if self.defer_sync and not ledger.broken:
                return ledger.stage(nonce, timestamp)
            if ledger.needs_compaction(len(seen)):
                ledger.compact(seen.items(), self._floor)  # includes this nonce
                return 0
            return ledger.append(nonce, timestamp)
        except OSError as exc:
            ledger.mark_broken(exc)
            return -1

    def release_ids(self, accepted: Iterable[tuple[str, float]]) -> None:
        """Free the ids of ``accepted`` commands, ``(command_id, issued_at)``, for a retry: they
        were refused before they could act, because ``make_durable`` raised, as ``ledger_error``
        on arrival leaves an id free. An id a later command took once this one's left the
        window (another timestamp) stays that command's. The nonces stay used, so the same
        message is still a replay."""
        with self._lock:
            for command_id, issued_at in accepted:
                if self._ids.get(command_id) == issued_at:
                    del self._ids[command_id]

    def make_durable(self) -> None:
        """Return once every nonce accepted so far is durable (``defer_sync``): the staged
        records are written (one ``write``), then synced (one ``fdatasync`` with ``"fsync"``);
        a ledger that failed is rewritten whole instead. Raises ``OSError`` when the ledger
        cannot make them so (then act on none of them); the nonces stay owed, so the next
        call tries again (a command still queued behind a failed call never takes effect
        before its nonce is on disk). An interrupt propagates, owing them the same way."""
        ledger = self._ledger
        if ledger is None:
            return
        seq = 0
        try:
            with self._lock:
                seq, self._unsynced = self._unsynced, 0
                if seq == 0:
                    return
                # Broken (what it held may be lost), or grown past twice the live nonces:
                # every live nonce written anew, staged ones included, durable on return.
                if ledger.needs_compaction(len(self._seen)):
                    ledger.compact(self._seen.items(), self._floor)
                    return
                ledger.write_staged()
            ledger.sync(seq)
        except BaseException as exc:
            with self._lock:  # still owed: the next call writes and syncs them again
                self._unsynced = max(self._unsynced, seq)
            if isinstance(exc, OSError):
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
        ids, id_expiry = self._ids, self._id_expiry  # each id has a nonce as old: pruned here
        while id_expiry and id_expiry[0][0] < cutoff:
            timestamp, command_id = heapq.heappop(id_expiry)
            if ids.get(command_id) == timestamp:
                del ids[command_id]
        ledger = self._ledger
        if ledger is not None and ledger.staged > 2 * len(self._seen) + ledger.compact_slack:
            ledger.forget_staged(self._seen)  # a stalled trainer's: bounded as the rest


def _check_signing_arguments(command: object, keyring: object) -> None:
    if not isinstance(command, AdaptationCommand):
        raise TypeError(
            f"command must be an AdaptationCommand (make_*_command builds one), "
            f"got {type(command).__name__}"
        )
    checked_keyring(keyring)


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
