"""HMAC authentication of Leyline commands (docs/design.md §5).

A command is signed with HMAC-SHA256 over ``SerializeToString(deterministic=True)`` of the
whole ``AdaptationCommand`` with ``metadata.signature`` cleared. Keys live in a ``Keyring``
(by ``key_id``) loaded from configuration, an environment variable or a file, never from code.

The verifier checks, in order: the envelope is present, the signature (constant-time), the
freshness of the timestamp, and that the nonce is unseen. A nonce is recorded only after the
signature and freshness pass, and is forgotten once its timestamp leaves the freshness window
(it would be rejected as stale from then on), so the ledger holds at most
``rate x 2 x freshness_s`` entries however many commands arrive.
"""

from __future__ import annotations

import heapq
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable

from kasmina.leyline import AdaptationCommand
from kasmina.utils.keyring import Keyring

logger = logging.getLogger(__name__)

__all__ = [
    "CommandVerifier",
    "compute_signature",
    "sign_command",
]

MAX_NONCE_CHARS = 256


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
    return keyring.digest(key_id, payload)


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


class CommandVerifier:
    """Checks signature, freshness and replay of commands; keeps a bounded nonce ledger.

    Reasons returned on rejection: ``missing_metadata``, ``missing_signature``,
    ``missing_nonce``, ``bad_nonce``, ``unknown_key_id``, ``bad_signature``, ``stale``,
    ``future``, ``replay``. ``"ok"`` on success.
    """

    def __init__(
        self,
        keyring: Keyring,
        freshness_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not freshness_s > 0:
            raise ValueError(f"freshness_s must be positive, got {freshness_s}")
        self.keyring = keyring
        self.freshness_s = float(freshness_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # nonce -> command timestamp
        self._expiry: list[tuple[float, str]] = []  # min-heap of (timestamp, nonce)
        # The newest timestamp of any forgotten nonce. Commands at or below it are stale even
        # if the clock later steps backwards, so a forgotten nonce can never be replayed.
        self._floor = float("-inf")

    @property
    def ledger_size(self) -> int:
        return len(self._seen)

    def verify(self, command: AdaptationCommand, *, record_nonce: bool = True) -> tuple[bool, str]:
        """``(ok, reason)``. With ``record_nonce=False`` the command is checked (a replay is
        still refused) but its nonce is not used up, so it can be executed afterwards."""
        if not command.HasField("metadata"):
            return False, "missing_metadata"
        metadata = command.metadata
        signature = metadata.signature
        if not signature:
            return False, "missing_signature"
        nonce = metadata.nonce
        if not nonce:
            return False, "missing_nonce"
        if len(nonce) > MAX_NONCE_CHARS:
            return False, "bad_nonce"
        expected = compute_signature(command, self.keyring, metadata.key_id)
        if expected is None:
            return False, "unknown_key_id"
        if not hmac.compare_digest(expected, signature):
            return False, "bad_signature"

        ts = metadata.timestamp
        timestamp = ts.seconds + ts.nanos * 1e-9
        now = self._clock()
        with self._lock:
            self._prune(now)
            if timestamp < now - self.freshness_s or timestamp <= self._floor:
                return False, "stale"
            if timestamp > now + self.freshness_s:
                return False, "future"
            if nonce in self._seen:
                return False, "replay"
            if record_nonce:
                self._seen[nonce] = timestamp
                heapq.heappush(self._expiry, (timestamp, nonce))
        return True, "ok"

    def _prune(self, now: float) -> None:
        """Forget nonces whose timestamp has left the window (they can only be stale now)."""
        cutoff = now - self.freshness_s
        expiry = self._expiry
        while expiry and expiry[0][0] < cutoff:
            timestamp, nonce = heapq.heappop(expiry)
            del self._seen[nonce]
            self._floor = timestamp  # pops come in increasing timestamp order
