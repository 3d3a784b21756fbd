"""HMAC authentication of Leyline commands (DESIGN §5).

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

import hashlib
import heapq
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from kasmina.leyline import AdaptationCommand

logger = logging.getLogger(__name__)

__all__ = [
    "CommandVerifier",
    "Keyring",
    "compute_signature",
    "generate_key",
    "sign_command",
]

MIN_KEY_BYTES = 16
MAX_NONCE_CHARS = 256
DEFAULT_ENV_VAR = "KASMINA_HMAC_KEYS"


def generate_key(num_bytes: int = 32) -> bytes:
    """A fresh random HMAC key (store it in configuration, never in code)."""
    if num_bytes < MIN_KEY_BYTES:
        raise ValueError(f"HMAC keys need at least {MIN_KEY_BYTES} bytes, got {num_bytes}")
    return secrets.token_bytes(num_bytes)


class Keyring:
    """HMAC keys by ``key_id``. Key material never appears in ``repr`` or logs."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        self._keys: dict[str, bytes] = {}
        # One keyed HMAC per key, copied per message: the key schedule is paid once.
        self._macs: dict[str, hmac.HMAC] = {}
        for key_id, key in keys.items():
            if not isinstance(key_id, str) or not key_id:
                raise ValueError("key ids must be non-empty strings")
            if not isinstance(key, (bytes, bytearray)):
                raise TypeError(f"key {key_id!r} must be bytes, got {type(key).__name__}")
            if len(key) < MIN_KEY_BYTES:
                raise ValueError(f"key {key_id!r} is shorter than {MIN_KEY_BYTES} bytes")
            self._keys[key_id] = bytes(key)
            self._macs[key_id] = hmac.new(bytes(key), digestmod=hashlib.sha256)

    @classmethod
    def from_env(cls, var: str = DEFAULT_ENV_VAR) -> Keyring:
        """Load ``"id:hex,id2:hex"`` or a JSON object ``{"id": "hex"}`` from ``var``."""
        text = os.environ.get(var, "").strip()
        if not text:
            raise ValueError(f"environment variable {var} is not set or empty")
        if text.startswith("{"):
            return cls._from_json(text, f"${var}")
        keys: dict[str, bytes] = {}
        for item in text.split(","):
            key_id, sep, hex_key = item.strip().partition(":")
            if not sep:
                raise ValueError(f"${var}: expected 'key_id:hexkey' items separated by commas")
            keys[key_id.strip()] = _unhex(hex_key.strip(), key_id, f"${var}")
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | Path) -> Keyring:
        """Load a JSON object ``{"key_id": "hexkey", ...}`` from ``path``."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if os.name == "posix" and path.stat().st_mode & 0o077:
            logger.warning("key file %s is readable by group/others; restrict it to 0600", path)
        return cls._from_json(text, str(path))

    @classmethod
    def _from_json(cls, text: str, origin: str) -> Keyring:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{origin}: not valid JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{origin}: expected a JSON object of key_id -> hex key")
        keys = {}
        for key_id, hex_key in data.items():
            if not isinstance(hex_key, str):
                raise ValueError(f"{origin}: key {key_id!r} must be a hex string")
            keys[key_id] = _unhex(hex_key, key_id, origin)
        return cls(keys)

    def get(self, key_id: str) -> bytes | None:
        return self._keys.get(key_id)

    def digest(self, key_id: str, message: bytes) -> bytes | None:
        """HMAC-SHA256 of ``message`` under ``key_id`` (None if the key is unknown)."""
        mac = self._macs.get(key_id)
        if mac is None:
            return None
        mac = mac.copy()
        mac.update(message)
        return mac.digest()

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"Keyring(key_ids={list(self._keys)!r})"


def _unhex(hex_key: str, key_id: str, origin: str) -> bytes:
    try:
        return bytes.fromhex(hex_key)
    except ValueError:
        raise ValueError(f"{origin}: key {key_id!r} is not valid hex") from None


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
