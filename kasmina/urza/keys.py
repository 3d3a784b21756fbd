"""Publisher keys: who may sign Urza artifacts, and what a trainer holds to check them.

Artifacts are signed with **Ed25519**, an asymmetric scheme, so that verifying and signing need
different keys. A publisher holds a ``PublisherKey`` (private, in a 0600 file); a trainer is
configured with ``TrustedPublishers`` (public keys by key id) and nothing else, so nothing a
trainer holds can sign an artifact. Controller commands use HMAC keys (``kasmina.utils.keyring``),
a different algorithm and key type, so a command key cannot sign an artifact either, and a
publisher key cannot sign a command.

Neither class signs or verifies arbitrary bytes: both prefix every manifest with
``MANIFEST_SIGNATURE_TAG`` first (domain separation). A signature made for any other purpose,
even with the same Ed25519 key, never verifies as a manifest signature, and a manifest
signature is never valid for anything else.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kasmina.utils.atomic import atomic_write_bytes, install_new_file, remove_stale_temporaries_of
from kasmina.utils.files import read_regular_file, read_text_file
from kasmina.utils.signed_json import strict_json_loads

logger = logging.getLogger(__name__)

__all__ = [
    "KEY_ID_HEADER",
    "MANIFEST_SIGNATURE_TAG",
    "PublisherKey",
    "TrustedPublishers",
    "check_private_key_file",
    "parse_public_key",
    "public_key_text",
    "validate_key_id",
]

# Prefixed to the canonical manifest before signing and verifying: the purpose of the signature.
MANIFEST_SIGNATURE_TAG = b"kasmina-urza-manifest-v2\0"
# The line of a key file naming its key id (PEM allows text before the BEGIN line).
KEY_ID_HEADER = "kasmina-publisher-key-id:"
RAW_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# A key file is a few hundred bytes; anything far larger is not one (and is not read whole).
MAX_KEY_FILE_BYTES = 64 * 1024
_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Hex digits only (even count): base64 of 32 bytes always ends in "=", so it never matches.
_HEX_RE = re.compile(r"(?:[0-9A-Fa-f]{2})+")
_PEM_RE = re.compile(rb"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----", re.DOTALL)


def validate_key_id(key_id: object) -> str:
    """Key ids appear in manifests, config files and logs: 1-64 of ``[A-Za-z0-9._-]``."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.fullmatch(key_id):
        raise ValueError(
            f"invalid publisher key id {key_id!r}: 1-64 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return key_id


def public_key_text(key: Ed25519PublicKey) -> str:
    """The configuration form of a public key: standard base64 of its 32 raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def _fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def parse_public_key(value: object, *, key_id: str = "?") -> Ed25519PublicKey:
    """An Ed25519 public key from its configuration form.

    Accepted: an ``Ed25519PublicKey``; 32 raw bytes; 64 hex digits or base64 of the 32 raw
    bytes; a PEM ``PUBLIC KEY`` block. A private key in any form is refused: a trainer must
    never be handed one. Raises ``ValueError`` (``TypeError`` for another type).
    """
    if isinstance(value, Ed25519PublicKey):
        return value
    if isinstance(value, (Ed25519PrivateKey, PublisherKey)):
        raise TypeError(
            f"publisher {key_id!r}: a private key was given where only a public key belongs "
            "(trainers hold public keys only; use PublisherKey.public_key)"
        )
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    elif isinstance(value, str):
        text = value.strip()
        if "PRIVATE KEY" in text:
            raise ValueError(
                f"publisher {key_id!r}: this is a private key; configure trainers with the "
                "public key only ('kasmina keygen --publisher' prints it)"
            )
        if text.startswith("-----BEGIN PUBLIC KEY-----"):
            return _load_pem_public(text.encode("ascii", "replace"), key_id)
        raw = _decode_key_text(text, key_id)
    else:
        raise TypeError(
            f"publisher {key_id!r}: public key must be base64 or hex text, got "
            f"{type(value).__name__}"
        )
    if len(raw) != RAW_KEY_BYTES:
        raise ValueError(
            f"publisher {key_id!r}: an Ed25519 public key is {RAW_KEY_BYTES} bytes, got {len(raw)}"
        )
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"publisher {key_id!r}: not an Ed25519 public key ({exc})") from None


def _decode_key_text(text: str, key_id: str) -> bytes:
    if _HEX_RE.fullmatch(text):
        return bytes.fromhex(text)
    try:
        # Standard or URL-safe alphabet, strictly: no stray characters are skipped.
        standard = text.translate(str.maketrans("-_", "+/"))
        return base64.b64decode(standard.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError(
            f"publisher {key_id!r}: public key is neither 64 hex digits nor base64"
        ) from None


def _load_pem_public(pem: bytes, key_id: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"publisher {key_id!r}: unreadable PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"publisher {key_id!r}: PEM public key is not Ed25519")
    return key


class PublisherKey:
    """A publisher's Ed25519 private key and its key id: the one thing that signs artifacts.

    Only a publisher (``kasmina urza publish``, a CI job) should hold one; trainers get
    ``trusted_publishers()`` (the public half). The key material never appears in ``repr``.
    The only signing operation is ``sign_manifest``, which always adds the manifest purpose tag,
    so this key cannot be made to sign a command or any other message.
    """

    def __init__(self, key_id: str, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(
                f"private_key must be an Ed25519PrivateKey, got {type(private_key).__name__}"
            )
        self._key_id = validate_key_id(key_id)
        self._private = private_key
        self._public = private_key.public_key()

    @classmethod
    def generate(cls, key_id: str | None = None) -> PublisherKey:
        """A fresh key; ``key_id`` defaults to ``publisher-<16 hex digits of its fingerprint>``."""
        private = Ed25519PrivateKey.generate()
        if key_id is None:
            key_id = f"publisher-{_fingerprint(private.public_key())}"
        return cls(key_id, private)

    @classmethod
    def from_file(cls, path: str | Path, key_id: str | None = None) -> PublisherKey:
        """Load a key file: PEM (PKCS#8, unencrypted; ``save`` writes one with a key-id line)
        or the 32 raw bytes of the private key.

        The key id comes from the file's ``kasmina-publisher-key-id:`` line, or ``key_id``
        when the file has none (a plain PEM or raw file); both given and different is an
        error, since it suggests the wrong file. A file that group or others can access is
        refused (``PermissionError``), like ssh does, because anyone who can read it can sign
        artifacts that every trainer will load.
        """
        path = Path(path)
        data, st = read_regular_file(path, MAX_KEY_FILE_BYTES, what="publisher key file")
        if os.name == "posix" and st.st_mode & 0o077:
            raise PermissionError(
                f"publisher key file {path} is accessible by group/others (mode "
                f"{st.st_mode & 0o777:04o}); anyone who reads it can sign artifacts: "
                f"run 'chmod 600 {path}'"
            )
        if len(data) == RAW_KEY_BYTES and b"-----" not in data:
            if key_id is None:
                raise ValueError(f"{path}: a raw key file holds no key id; pass one")
            return cls(key_id, Ed25519PrivateKey.from_private_bytes(data))
        private = _load_pem_private(data, path)  # what the file is, before what it is named
        return cls(_file_key_id(data, key_id, path), private)

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public

    @property
    def public_key_text(self) -> str:
        """The public key as trainers configure it (base64 of the 32 raw bytes)."""
        return public_key_text(self._public)

    def trusted_publishers(self) -> TrustedPublishers:
        """Only the public half, as a ``TrustedPublishers`` a trainer (or a test) can verify
        with."""
        return TrustedPublishers({self._key_id: self._public})

    def sign_manifest(self, canonical: bytes) -> bytes:
        """The Ed25519 signature of ``MANIFEST_SIGNATURE_TAG + canonical`` (64 bytes).

        ``canonical`` is the canonical JSON of an unsigned manifest; use
        ``kasmina.urza.artifact.sign_manifest`` rather than calling this directly.
        """
        if not isinstance(canonical, bytes):
            raise TypeError("canonical must be bytes")
        return self._private.sign(MANIFEST_SIGNATURE_TAG + canonical)

    def to_pem(self) -> bytes:
        """The key file's contents: a key-id line, then the PKCS#8 PEM private key."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return f"{KEY_ID_HEADER} {self._key_id}\n".encode("ascii") + pem

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the key file with mode 0600 (created so, never widened afterwards).

        An existing file is refused (``FileExistsError``) unless ``overwrite``: a private key
        is not replaced by accident. Either way the key is written to a temp file beside
        ``path`` and fsync'd before it appears there, so a kill never leaves a torn key under
        the final name (which would block the retry): without ``overwrite`` it is linked into
        place, which never overwrites (``install_new_file``); with ``overwrite`` it is renamed
        over the old key, which is never half-overwritten, and only a regular file is replaced
        (anything else at ``path``, a directory, a FIFO, a device, is refused with
        ``ValueError``). Temp files of killed saves, older than ``STALE_TEMPORARY_S``, are
        removed. Errors name ``path``, never the temporary file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_pem()
        remove_stale_temporaries_of(path)
        if not overwrite:
            try:
                installed = install_new_file(path, data)
            except OSError as exc:
                if exc.errno is None:
                    raise
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            if not installed:
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
            return
        try:
            mode: int | None = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise ValueError(f"{path} exists and is not a regular file; not replaced by a key")
        try:
            atomic_write_bytes(path, [data])
        except OSError as exc:
            if exc.errno is None:
                raise
            raise OSError(exc.errno, exc.strerror, str(path)) from None

    def __repr__(self) -> str:
        return f"PublisherKey(key_id={self._key_id!r}, public_key={self.public_key_text!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # A private key must not leave the process by accident (pickled into a worker, a
        # torch.distributed broadcast, a checkpoint): only its file or to_pem() carry it.
        raise TypeError("PublisherKey cannot be pickled; pass trusted_publishers() instead")


def check_private_key_file(path: str | Path) -> None:
    """``ValueError`` unless ``path`` holds a publisher private key as ``PublisherKey.from_file``
    reads one (PEM, or the 32 raw bytes), whatever its mode and key id: the only file that
    ``kasmina keygen --publisher --force`` replaces. A command keyring there would lose all its
    keys to a publisher key, with nothing to say so."""
    path = Path(path)
    data, _ = read_regular_file(path, MAX_KEY_FILE_BYTES, what="file")
    if len(data) != RAW_KEY_BYTES or b"-----" in data:
        _load_pem_private(data, path)


def _file_key_id(data: bytes, key_id: str | None, path: Path) -> str:
    found = None
    for line in data.split(b"-----BEGIN", 1)[0].decode("utf-8", "replace").splitlines():
        if line.strip().startswith(KEY_ID_HEADER):
            found = line.strip()[len(KEY_ID_HEADER) :].strip()
    if found is not None and key_id is not None and found != key_id:
        raise ValueError(f"{path} holds publisher key {found!r}, not {key_id!r}")
    chosen = found if found is not None else key_id
    if chosen is None:
        raise ValueError(f"{path} names no key id ('{KEY_ID_HEADER} ID' line); pass one")
    return chosen


def _load_pem_private(data: bytes, path: Path) -> Ed25519PrivateKey:
    match = _PEM_RE.search(data)
    if match is None:
        raise ValueError(f"{path}: not a PEM private key or 32 raw key bytes")
    if match.group(1) != b"PRIVATE KEY":
        raise ValueError(
            f"{path}: expected an unencrypted PKCS#8 'PRIVATE KEY' block, found "
            f"{match.group(1).decode('ascii')!r}"
        )
    try:
        key = serialization.load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"{path}: unreadable PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: the private key is not Ed25519")
    return key


class TrustedPublishers:
    """Publisher public keys by key id: everything a trainer needs to verify artifacts, and
    nothing that can sign one.

    Built from a mapping of key id to an ``Ed25519PublicKey``, 32 raw bytes, or their hex or
    base64 text (``KasminaConfig.urza_trusted_publishers``), or from a JSON file of the same
    mapping (``urza_publishers_file``). An empty set trusts no publisher: every artifact is
    refused.
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey | bytes | str] | None = None) -> None:
        if keys is None:
            keys = {}
        if not isinstance(keys, Mapping):
            raise TypeError(
                "trusted publishers must be a mapping of key id -> public key, got "
                f"{type(keys).__name__}"
            )
        self._keys: dict[str, Ed25519PublicKey] = {}
        ids: dict[bytes, str] = {}
        for key_id, value in keys.items():
            key = self._keys[validate_key_id(key_id)] = parse_public_key(value, key_id=key_id)
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            if raw in ids:  # revoking one id would leave the publisher trusted under the other
                raise ValueError(
                    f"publisher key ids {ids[raw]!r} and {key_id!r} hold the same public key: "
                    "one key under two ids cannot be revoked by removing either"
                )
            ids[raw] = key_id

    @classmethod
    def from_file(cls, path: str | Path) -> TrustedPublishers:
        """A JSON object ``{"key_id": "<public key>", ...}`` (what ``kasmina keygen --publisher``
        prints). Public keys are no secret, but whoever can write this file chooses which
        publishers are trusted, so a group- or world-writable file is warned about."""
        path = Path(path)
        text, st = read_text_file(path, what="trusted publishers file")
        if os.name == "posix" and st.st_mode & 0o022:
            logger.warning(
                "trusted publishers file %s is writable by group/others: whoever can write it "
                "chooses which artifacts this trainer loads; restrict it to 0644 or tighter",
                path,
            )
        try:
            data = strict_json_loads(text)  # one key id twice is refused, not last-one-wins
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of key id -> public key")
        try:
            return cls(data)
        except (TypeError, ValueError) as exc:  # a bad key value: the file's fault
            raise ValueError(f"{path}: {exc}") from None

    def merged(
        self, other: TrustedPublishers | Mapping[str, Ed25519PublicKey | bytes | str]
    ) -> TrustedPublishers:
        """Both sets; one key id bound to two different keys is an error, not a choice.
        ``other`` may be a mapping, as the constructor takes (anything else: ``TypeError``)."""
        if not isinstance(other, TrustedPublishers):
            other = TrustedPublishers(other)  # a mapping checked as the constructor checks it
        keys = dict(self._keys)
        for key_id, key in other._keys.items():
            if key_id in keys and public_key_text(keys[key_id]) != public_key_text(key):
                raise ValueError(f"publisher key id {key_id!r} is configured with two keys")
            keys[key_id] = key
        return TrustedPublishers(keys)

    def get(self, key_id: str) -> Ed25519PublicKey | None:
        return self._keys.get(key_id)

    def ids_holding(self, secrets: Iterable[bytes]) -> list[str]:
        """The key ids whose 32 raw public-key bytes are one of ``secrets``: a command keyring
        given as the publishers file parses (both are JSON of key id -> 32 bytes in hex), and
        every artifact was then refused as signed by an "unknown publisher"."""
        wanted = set(secrets)
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return [k for k, key in self._keys.items() if key.public_bytes(*raw) in wanted]

    def manifest_signature_valid(self, key_id: str, canonical: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is ``key_id``'s Ed25519 signature of ``MANIFEST_SIGNATURE_TAG
        + canonical``. False for an unknown key id or a signature of the wrong length."""
        key = self._keys.get(key_id)
        if key is None or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            key.verify(signature, MANIFEST_SIGNATURE_TAG + canonical)
        except InvalidSignature:
            return False
        return True

    def to_json(self) -> dict[str, str]:
        """The configuration form: key id -> base64 public key."""
        return {key_id: public_key_text(key) for key_id, key in self._keys.items()}

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrustedPublishers):
            return NotImplemented
        return self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]  # mutable-looking container: not hashable

    def __repr__(self) -> str:
        shown = {key_id: _fingerprint(key) for key_id, key in self._keys.items()}
        return f"TrustedPublishers({shown!r})"
