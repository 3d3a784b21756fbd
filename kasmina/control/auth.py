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
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Collection

from kasmina.control.ledger import NonceLedger
from kasmina.leyline import AdaptationCommand
from kasmina.utils.keyring import Keyring

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
