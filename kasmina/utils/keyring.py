"""Keys by ``key_id``: the keyring that holds HMAC secrets, loaded from configuration.

Keys come from a mapping, an environment variable (``KASMINA_HMAC_KEYS``) or a JSON file, never
from code; key material never appears in ``repr`` or logs.

A ``Keyring`` authenticates controller commands. It does not sign Urza artifacts: a symmetric
key that can verify can also forge, so artifacts are signed with Ed25519 publisher keys that
trainers hold only the public half of (``kasmina.urza.keys``). The one artifact use left is
checking a retired HMAC manifest before it is re-signed (``kasmina.urza.publish``). Values must
be ``bytes``, so an Ed25519 key object cannot be put in a keyring by mistake.

A keyring file is read through ``kasmina.utils.files.read_text_file``: a FIFO, a device or a
directory is refused at once, without blocking, and at most a fixed number of bytes is read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path

from kasmina.utils.files import read_text_file
from kasmina.utils.signed_json import strict_json_loads

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ENV_VAR",
    "MIN_KEY_BYTES",
    "Keyring",
    "generate_key",
    "hmac_equivalent",
]


MIN_KEY_BYTES = 16


DEFAULT_ENV_VAR = "KASMINA_HMAC_KEYS"


def generate_key(num_bytes: int = 32) -> bytes:
    """A fresh random HMAC key (store it in configuration, never in code)."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, Integral):
        raise TypeError(
            f"num_bytes must be an int (at least {MIN_KEY_BYTES}), "
            f"got {type(num_bytes).__name__} {num_bytes!r:.40}"
        )
    if num_bytes < MIN_KEY_BYTES:
        raise ValueError(
            f"num_bytes must be at least {MIN_KEY_BYTES} (HMAC keys need that many bytes), "
            f"got {num_bytes}"
        )
    return secrets.token_bytes(num_bytes)


def checked_keyring(value: object) -> Keyring:
    """``value`` if it is a :class:`Keyring`, else ``TypeError`` with the remedy (a dict of keys
    is the usual slip; its contents are never shown: they hold key material)."""
    if not isinstance(value, Keyring):
        raise TypeError(
            f"keyring must be a Keyring, e.g. Keyring({{key_id: key_bytes}}), got "
            f"{type(value).__name__}"
        )
    return value


def command_keyring(value: object, origin: str = "the keyring") -> Keyring:
    """``checked_keyring(value)``, and not empty: a trainer's command keys. A keyring with no
    key is a valid value (a file ``kasmina keygen --append`` adds to), but a trainer given one
    refused every command as signed by an unknown key, with nothing said at startup."""
    keyring = checked_keyring(value)
    if not len(keyring):
        raise ValueError(
            f"{origin} holds no key: every command would be refused as signed by an unknown "
            "key; add one ('kasmina keygen --out FILE --append', or KASMINA_HMAC_KEYS=id:hex)"
        )
    return keyring


_HMAC_BLOCK = hashlib.sha256().block_size


def hmac_equivalent(key: bytes) -> bytes:
    """The HMAC-SHA256 key ``key`` acts as: one longer than the 64-byte block is hashed, and
    every key is zero-padded to the block, so ``K`` and ``K + b"\\0"`` (or a long key and its
    digest) sign every message alike; compared in this form, they are one secret."""
    if len(key) > _HMAC_BLOCK:
        key = hashlib.sha256(key).digest()
    return key.ljust(_HMAC_BLOCK, b"\0")


class Keyring:
    """HMAC keys by ``key_id``. Key material never appears in ``repr`` or logs."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not isinstance(keys, Mapping):  # its contents are not shown: they hold key material
            raise TypeError(
                f"keys must be a mapping of key id -> bytes, e.g. {{'ctl': key}} or dict(pairs), "
                f"got {type(keys).__name__}"
            )
        self._keys: dict[str, bytes] = {}
        # One keyed HMAC per key, copied per message: the key schedule is paid once.
        self._macs: dict[str, hmac.HMAC] = {}
        ids: dict[bytes, tuple[str, int]] = {}  # each secret's first id and position
        for position, (key_id, key) in enumerate(keys.items()):
            if not isinstance(key_id, str) or not key_id:
                raise ValueError("key ids must be non-empty strings")
            if not isinstance(key, (bytes, bytearray)):
                named = _named(key_id, position)
                raise TypeError(f"{named} must be bytes, got {type(key).__name__}")
            if len(key) < MIN_KEY_BYTES:
                named = _named(key_id, position)
                raise ValueError(f"{named} is shorter than {MIN_KEY_BYTES} bytes")
            secret = bytes(key)
            same = hmac_equivalent(secret)  # HMAC keys that differ only as HMAC pads them
            if same in ids:  # removing one id would leave the secret valid under another
                raise ValueError(
                    f"{_named(key_id, position)} is the same secret as {_named(*ids[same])}: "
                    "one secret under two ids cannot be revoked by removing either; give each "
                    "id its own key"
                )
            ids[same] = (key_id, position)
            self._keys[key_id] = secret
            self._macs[key_id] = hmac.new(secret, digestmod=hashlib.sha256)

    @classmethod
    def from_env(cls, var: str = DEFAULT_ENV_VAR) -> Keyring:
        """Load ``"id:hex,id2:hex"`` or a JSON object ``{"id": "hex"}`` from ``var``."""
        text = os.environ.get(var, "").strip()
        if not text:
            raise ValueError(f"environment variable {var} is not set or empty")
        if text.startswith("{"):
            return cls._from_json(text, f"${var}")
        keys: dict[str, bytes] = {}
        for position, item in enumerate(text.split(",")):
            key_id, sep, hex_key = item.strip().partition(":")
            if not sep:
                raise ValueError(f"${var}: expected 'key_id:hexkey' items separated by commas")
            if key_id.strip() in keys:
                raise ValueError(f"${var}: {_named(key_id.strip(), position)} is given twice")
            keys[key_id.strip()] = _unhex(hex_key.strip(), key_id.strip(), position, f"${var}")
        return cls(keys)

    @classmethod
    def from_file(cls, path: str | Path) -> Keyring:
        """Load a JSON object ``{"key_id": "hexkey", ...}`` from ``path``; a file that group or
        others can access is warned about (a container's secret mount may fix its mode)."""
        path = Path(path)
        text, st = read_text_file(path, what="keyring file")
        if os.name == "posix" and st.st_mode & 0o077:  # a secret mount's fixed mode: warned
            logger.warning(
                "keyring file %s is accessible by group/others (mode %04o): anyone who reads "
                "it can sign commands; restrict it to 0600",
                path,
                st.st_mode & 0o777,
            )
        return cls._from_json(text, str(path))

    @classmethod
    def _from_json(cls, text: str, origin: str) -> Keyring:
        try:
            data = strict_json_loads(text)  # one key id twice is refused, not last-one-wins
        except ValueError as exc:
            raise ValueError(f"{origin}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{origin}: expected a JSON object of key_id -> hex key")
        keys = {}
        for position, (key_id, hex_key) in enumerate(data.items()):
            if not isinstance(hex_key, str):
                raise ValueError(f"{origin}: {_named(key_id, position)} must be a hex string")
            keys[key_id] = _unhex(hex_key, key_id, position, origin)
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

    def __reduce__(self) -> tuple[object, ...]:
        # Secrets do not leave the process by accident (pickled into a worker, a checkpoint):
        # refused with a way out, where the HMAC objects' own refusal said nothing useful.
        raise TypeError(
            "Keyring cannot be pickled (it holds secrets); build it where it is used, e.g. "
            "Keyring.from_env() in the worker"
        )


def _unhex(hex_key: str, key_id: str, position: int, origin: str) -> bytes:
    try:
        return bytes.fromhex(hex_key)
    except ValueError:
        raise ValueError(f"{origin}: {_named(key_id, position)} is not valid hex") from None


# A key id an error may quote: a plain name, not a run of hex as long as a key (a key file whose
# ids and keys were swapped must not print its secrets in the error that refuses it).
_PLAIN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY_LIKE = re.compile(f"[0-9a-fA-F]{{{2 * MIN_KEY_BYTES},}}")


def _named(key_id: object, position: int) -> str:
    """How an error names a key: by its id when that reads as a name, else by its position."""
    if isinstance(key_id, str) and _PLAIN_ID.fullmatch(key_id) and not _KEY_LIKE.match(key_id):
        return f"key {key_id!r}"
    return f"key #{position + 1} (its id is not shown: not a plain name, or like key material)"
