"""Urza artifact manifests: what they hold, how they are signed, how they are checked.

An artifact is a payload (a ``torch.export`` program saved as ``.pt2``) plus this manifest. A
``.pt2`` can hold pickles, so the manifest is the trust anchor: the publisher signs it with
**Ed25519** (a ``PublisherKey``; trainers hold only ``TrustedPublishers``, the public keys) over
``MANIFEST_SIGNATURE_TAG`` followed by its canonical JSON without the ``signature`` field, and
the manifest pins the payload's SHA-256 and size. ``verify_manifest`` and ``verify_payload``
must both pass before any payload byte is deserialised; only a manifest that came out of
``verify_manifest`` is marked ``verified``, and the kernel loader refuses any other.

Manifest version 2 is the Ed25519 one. Version 1 manifests (no ``manifest_version`` field) were
signed with HMAC-SHA256 under the same kind of key that authenticates controller commands, so
whoever could verify one could forge one; they are refused with a message saying how to re-sign
them (``kasmina urza resign``, ``kasmina.urza.publish.resign_artifact``).
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import io
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem, make_path_posix
from fsspec.implementations.memory import MemoryFileSystem

from kasmina.errors import ArtifactIntegrityError, NotARegularFileError
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.utils.files import open_regular_file
from kasmina.utils.ratelimit import clipped
from kasmina.utils.signed_json import canonical_json, finite_number, strict_json_loads

__all__ = [
    "ARTIFACT_FORMAT",
    "LEGACY_HMAC_MESSAGE",
    "MANIFEST_SUFFIX",
    "MANIFEST_VERSION",
    "PAYLOAD_SUFFIX",
    "UNKNOWN_PUBLISHER_KEY",
    "open_store",
    "absolute_local_url",
    "Manifest",
    "TensorSpec",
    "payload_sha256",
    "read_bounded",
    "shown",
    "sign_manifest",
    "validate_artifact_id",
    "verify_manifest",
    "verify_payload",
    "verify_payload_digest",
]

ARTIFACT_FORMAT = "torch.export/pt2"
# 2: Ed25519 over MANIFEST_SIGNATURE_TAG + canonical JSON. 1 (no field): the retired HMAC scheme.
MANIFEST_VERSION = 2
# The refusal of a version 1 manifest: what it is, and how to re-sign it.
LEGACY_HMAC_MESSAGE = (
    "manifest was signed with the retired HMAC scheme (manifest version 1), which is no longer "
    "accepted: an HMAC key that can verify an artifact can also forge one. Re-sign it with an "
    "Ed25519 publisher key ('kasmina keygen --publisher --out FILE', then 'kasmina urza resign "
    "--store URL --key FILE --hmac-keys OLD_KEYS.json --command-keys COMMAND_KEYS.json', the "
    "second keyring so that no command key is taken for an old one), or publish it again with "
    "'kasmina urza publish --key FILE', and give trainers the public key "
    "(urza_trusted_publishers)"
)
# How the refusal of a manifest signed by a publisher key the verifier does not trust begins
# (after the artifact's name): resign tells a key rotation's manifests by it.
UNKNOWN_PUBLISHER_KEY = "unknown publisher key"
# Store layout: two flat files per artifact, side by side.
PAYLOAD_SUFFIX = ".pt2"
MANIFEST_SUFFIX = ".manifest.json"
# Real manifests are about a kilobyte; anything near this is refused unread past it.
MAX_MANIFEST_BYTES = 4 << 20
# Store reads stream in chunks of this size (and are bounded to one chunk past their limit).
READ_CHUNK_BYTES = 1 << 20
# A local file URL whose host is ``localhost`` (the same file as with none), and the slashes
# after it: the whole URL's, or a chained one's last layer's (``simplecache::file://...``).
_LOCALHOST_FILE_URL = re.compile(r"(?i)(?:^|(?<=::))(file|local)://localhost(?:/+|\Z)")
_LOCAL_FILE_URL = re.compile(r"(?:file|local)://")
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_FIELDS = (
    "artifact_id",
    "blueprint",
    "sha256",
    "size",
    "input_spec",
    "key_id",
    "created",
    "torch_version",
    "format",
    "signature",
    "manifest_version",
)


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem of a store URL and its root path (no trailing slash).

    ``::`` chains filesystems in fsspec (``simplecache::s3://bucket/store``); in a local path
    whose part before it is no protocol (``runs/a::b``), or that is a local file URL
    (``file:///x/a::b``: no layer can follow a local file), it is part of a name, and the path
    is taken whole (fsspec read ``/x/a::b`` and ``file:///x/a::b`` as ``/x/a``, and ``a::b`` as
    ``a:``: the store was written somewhere other than the directory named).
    ``file://localhost/p`` is the local ``/p`` (RFC 8089), also as a chain's layer
    (``simplecache::file://localhost/p``), where fsspec read a directory ``localhost/p`` under
    the working one."""
    url = _LOCALHOST_FILE_URL.sub(lambda local: f"{local.group(1)}:///", url)
    head = url.split("::", 1)[0]
    file_url = _LOCAL_FILE_URL.match(url)
    if "::" in url and (
        file_url or ("://" not in head and head not in fsspec.available_protocols())
    ):
        path = url[file_url.end() :] if file_url else url
        return LocalFileSystem(**(storage_options or {})), make_path_posix(path).rstrip("/")
    if "::" in url and len(chain_layers(url)) == 1:  # an IPv6 host's (fsspec splits there too)
        fs = fsspec.filesystem(fsspec.core.split_protocol(url)[0], **(storage_options or {}))
        return fs, fs._strip_protocol(url).rstrip("/")
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def absolute_local_url(url: str) -> str:
    """``url`` with a local store's relative directory made absolute, as ``open_store`` reads it
    now: a local path (``runs/a::b`` too), or a chain's last layer that is a plain path
    (``simplecache::rel/dir``: fsspec reads it from the working directory). Kept relative, a
    chdir between two clients (a resumed run, a second manager) read another directory's
    store. Any other URL comes back as it is."""
    if "://" in url:
        return url
    *layers, last = chain_layers(url)
    if layers and layers[0] in fsspec.available_protocols():  # a chain: not opened here
        return "::".join([*layers, make_path_posix(last)]) if last and ":" not in last else url
    fs, root = open_store(url)
    return (root or "/") if isinstance(fs, LocalFileSystem) else url


def chain_layers(url: str) -> list[str]:
    """The layers of an fsspec chained URL (``simplecache::http://...``, ``tar://x::<path>``),
    split at each ``::`` outside brackets: an IPv6 host's (``http://[fe80::1]:8080``) is not a
    layer's; after an unbalanced ``[`` the rest is one layer (whose URL then does not parse)."""
    layers, depth, start, i = [], 0, 0, 0
    while i < len(url):
        if url[i] == "[":
            depth += 1
        elif url[i] == "]" and depth:
            depth -= 1
        elif not depth and url.startswith("::", i):
            layers.append(url[start:i])
            start = i = i + 2
            continue
        i += 1
    return [*layers, url[start:]]


def shown(value: object) -> str:
    """``repr(value)`` for a message, cut short: a field read from a store before its signature
    is checked may be megabytes long (logged, and kept in command logs). The length said is
    the value's own (a string's characters, not its quoted repr's)."""
    return clipped(repr(value), 80, len(value) if isinstance(value, str) else None)


def validate_artifact_id(artifact_id: object) -> str:
    """Artifact ids name files in the store, so only ``[A-Za-z0-9._-]`` (no paths) is allowed."""
    if not isinstance(artifact_id, str) or not _ID_RE.fullmatch(artifact_id):
        raise ValueError(
            f"invalid artifact id {shown(artifact_id)}: 1-128 characters of [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return artifact_id


def payload_sha256(payload: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(payload).hexdigest()


def read_bounded(
    fs: Any,
    path: str,
    limit: int,
    *,
    what: str,
    why: str,
    chunk_bytes: int = READ_CHUNK_BYTES,
    hasher: Any = None,
    cancelled: threading.Event | None = None,
    open_kwargs: Mapping[str, Any] | None = None,
) -> bytes:
    """Stream ``path`` from ``fs`` in chunks, refusing it once it is longer than ``limit``.

    At most ``limit + 1`` bytes are ever requested, so a huge object (or an endless
    stream) costs at most the limit plus one chunk of memory and I/O. ``hasher`` (e.g.
    ``hashlib.sha256()``) is updated with every chunk as it arrives. ``cancelled`` is checked
    before every chunk: once set (the caller gave up on this read) the read stops and raises
    ``TimeoutError``. Raises ``ArtifactIntegrityError`` ("``what`` is larger than ``limit``
    bytes (``why``)") for an oversize object, and ("``what`` is not a readable file") for an
    entry that is no readable file (:func:`not_a_readable_file`: that artifact's problem,
    answered by the store, not a failing store); ``FileNotFoundError`` and transport errors
    pass through. On a local filesystem the entry is opened non-blocking and anything but a
    regular file (a FIFO, a device, a directory) is refused so at once, before a byte is read.
    """
    if limit < 0 or chunk_bytes < 1:
        raise ValueError(f"need limit >= 0 and chunk_bytes >= 1, got {limit}, {chunk_bytes}")
    chunks: list[bytes] = []
    total = 0
    local = isinstance(fs, LocalFileSystem)
    try:
        with open_regular_file(path) if local else _open(fs, path, limit, open_kwargs) as f:
            while True:
                if cancelled is not None and cancelled.is_set():
                    raise TimeoutError(f"read of {path} abandoned after {total} bytes")
                chunk = f.read(min(chunk_bytes, limit + 1 - total))
                if not chunk:
                    break
                total += len(chunk)
                if total > limit:
                    raise ArtifactIntegrityError(
                        f"{what} is larger than {limit} bytes ({why}); refused after reading "
                        f"{total} bytes"
                    )
                if hasher is not None:
                    hasher.update(chunk)
                chunks.append(chunk)
        return b"".join(chunks)
    except NotARegularFileError as exc:
        raise ArtifactIntegrityError(
            f"{what} is not a readable file ({exc.kind}, not a regular file)"
        ) from None
    except OSError as exc:
        chunks.clear()
        if not not_a_readable_file(exc, local=local):
            raise
        reason = exc.strerror or type(exc).__name__
        raise ArtifactIntegrityError(f"{what} is not a readable file ({reason})") from None
    except BaseException:
        # Drop the data now: the traceback (kept by an abandoned future) must not pin it.
        chunks.clear()
        raise


def _open(fs: Any, path: str, limit: int, open_kwargs: Mapping[str, Any] | None) -> Any:
    """``path`` opened for reading, a file object of this read's own. fsspec's ``memory://``
    hands every reader of a path the one stored buffer, rewound: two concurrent reads (two
    clients on one store, a fetch beside a publish) moved each other's position, and each
    read some bytes twice and missed others, so a sound artifact was refused as corrupt. There
    its first ``limit + 1`` bytes are copied out in one call instead."""
    if isinstance(fs, MemoryFileSystem):
        try:
            return io.BytesIO(fs.cat_file(path, 0, limit + 1))
        except FileNotFoundError:
            if fs.isdir(path):
                raise IsADirectoryError(errno.EISDIR, "is a directory", path) from None
            raise
    return fs.open(path, "rb", **(open_kwargs or {}))


@dataclass(frozen=True)
class TensorSpec:
    """Shape (``None`` for a dynamic dimension) and dtype name of one example input."""

    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, obj: object) -> TensorSpec:
        if not isinstance(obj, dict) or set(obj) != {"shape", "dtype"}:
            raise ValueError("an input spec entry must be {'shape': [...], 'dtype': str}")
        shape, dtype = obj["shape"], obj["dtype"]
        if not isinstance(shape, list) or not all(
            d is None or (isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63)
            for d in shape
        ):
            raise ValueError("input spec shape must be a list of int64 sizes (>= 0) or nulls")
        if not isinstance(dtype, str) or not dtype:
            raise ValueError("input spec dtype must be a non-empty string")
        return cls(tuple(shape), dtype)


@dataclass(frozen=True)
class Manifest:
    """The signed description of one artifact (see the module docstring)."""

    artifact_id: str
    blueprint: str
    sha256: str
    size: int
    input_spec: tuple[TensorSpec, ...]
    key_id: str
    created: float
    torch_version: str
    format: str = ARTIFACT_FORMAT
    # Base64 of the 64-byte Ed25519 signature ("" while unsigned).
    signature: str = ""
    manifest_version: int = MANIFEST_VERSION
    # Set only by verify_manifest (not an init field, so dataclasses.replace() clears it).
    verified: bool = field(default=False, init=False, compare=False, repr=False)

    def unsigned_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["signature"], data["verified"]
        data["input_spec"] = [spec.to_json() for spec in self.input_spec]
        return data

    def to_json(self) -> bytes:
        """The stored form: indented JSON with the signature (what ``verify_manifest`` reads)."""
        data = self.unsigned_dict()
        data["signature"] = self.signature
        return json.dumps(data, sort_keys=True, indent=2).encode("utf-8")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Type-checked construction; raises ``ValueError`` on any malformed field."""
        missing = [name for name in _FIELDS if name not in data]
        unknown = sorted(set(data) - set(_FIELDS))
        if missing or unknown:
            raise ValueError(f"manifest fields missing {missing} or unexpected {unknown}")
        for name in ("blueprint", "key_id", "torch_version", "format", "signature"):
            if not isinstance(data[name], str):
                raise ValueError(f"manifest field {name!r} must be a string")
        validate_artifact_id(data["artifact_id"])
        if not isinstance(data["sha256"], str) or not _SHA_RE.fullmatch(data["sha256"]):
            raise ValueError("manifest sha256 must be 64 lowercase hex digits")
        size = data["size"]
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 2**63:
            raise ValueError("manifest size must be an int64 byte count (>= 0)")
        created = data["created"]
        if not isinstance(created, (int, float)) or isinstance(created, bool):
            raise ValueError("manifest created must be a number (Unix time)")
        if not finite_number(created):  # 10**400 too: float() raises OverflowError
            raise ValueError("manifest created must be a finite Unix time")
        # Kept as signed: an int made a float would write back (``to_json``, what a saved model
        # keeps) as other canonical JSON, which the signature no longer covers.
        if data["format"] != ARTIFACT_FORMAT:
            raise ValueError(f"unsupported artifact format {shown(data['format'])}")
        if data["manifest_version"] != MANIFEST_VERSION or isinstance(
            data["manifest_version"], bool
        ):
            raise ValueError(f"unsupported manifest version {shown(data['manifest_version'])}")
        if not isinstance(data["input_spec"], list):
            raise ValueError("manifest input_spec must be a list")
        return cls(
            artifact_id=data["artifact_id"],
            blueprint=data["blueprint"],
            sha256=data["sha256"],
            size=size,
            input_spec=tuple(TensorSpec.from_json(s) for s in data["input_spec"]),
            key_id=data["key_id"],
            created=created,
            torch_version=data["torch_version"],
            format=data["format"],
            signature=data["signature"],
            manifest_version=data["manifest_version"],
        )


def sign_manifest(manifest: Manifest, publisher: PublisherKey) -> Manifest:
    """A copy of ``manifest`` with ``key_id`` set to the publisher's and signed by its key.

    Only a ``PublisherKey`` signs: an HMAC ``Keyring`` (a command key) or a trainer's
    ``TrustedPublishers`` is refused with ``TypeError``; a field ``verify_manifest`` would
    refuse (a ``created`` past a float's range) with ``ValueError``, before anything is signed.
    """
    if not isinstance(publisher, PublisherKey):
        raise TypeError(
            "manifests are signed with an Ed25519 PublisherKey, not "
            f"{type(publisher).__name__} (HMAC keys authenticate controller commands only)"
        )
    unsigned = Manifest(
        **{
            **_init_fields(manifest),
            "key_id": publisher.key_id,
            "signature": "",
            "manifest_version": MANIFEST_VERSION,
        }
    )
    fields = unsigned.unsigned_dict()
    Manifest.from_dict({**fields, "signature": ""})  # ValueError: what no trainer would read
    signature = publisher.sign_manifest(canonical_json(fields))
    encoded = base64.b64encode(signature).decode("ascii")
    return Manifest(**{**_init_fields(unsigned), "signature": encoded})


def _init_fields(manifest: Manifest) -> dict[str, Any]:
    return {name: getattr(manifest, name) for name in _FIELDS}


def verify_manifest(
    raw: bytes,
    publishers: TrustedPublishers,
    *,
    expected_id: str | None = None,
    max_bytes: int = MAX_MANIFEST_BYTES,
) -> Manifest:
    """Parse and authenticate a stored manifest; any problem raises ``ArtifactIntegrityError``.

    Order: size bound, strict JSON, manifest version (a version 1 manifest gets the migration
    message, ``LEGACY_HMAC_MESSAGE``), signature present, publisher key one of ``publishers``,
    the Ed25519 signature over ``MANIFEST_SIGNATURE_TAG`` + canonical JSON, then field types,
    then the id. Only the signature check depends on a key, and only a public one.
    """
    if not isinstance(publishers, TrustedPublishers):
        raise TypeError(
            "manifests are verified with TrustedPublishers (publisher public keys), not "
            f"{type(publishers).__name__}"
        )
    where = f"artifact {expected_id!r}" if expected_id else "artifact"
    if len(raw) > max_bytes:
        raise ArtifactIntegrityError(f"{where}: manifest larger than {max_bytes} bytes")
    try:
        data = strict_json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactIntegrityError(f"{where}: manifest is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ArtifactIntegrityError(f"{where}: manifest is not a JSON object")
    version = data.get("manifest_version", 1)
    if version == 1 and not isinstance(version, bool):
        raise ArtifactIntegrityError(f"{where}: {LEGACY_HMAC_MESSAGE}")
    if version != MANIFEST_VERSION or isinstance(version, bool):
        raise ArtifactIntegrityError(
            f"{where}: unsupported manifest version {shown(version)} (this Kasmina reads version "
            f"{MANIFEST_VERSION})"
        )
    signature = data.get("signature")
    if not isinstance(signature, str) or not signature:
        raise ArtifactIntegrityError(f"{where}: manifest is unsigned")
    key_id = data.get("key_id")
    if not isinstance(key_id, str) or key_id not in publishers:
        trusted = ", ".join(publishers.key_ids) or "none configured"
        raise ArtifactIntegrityError(
            f"{where}: {UNKNOWN_PUBLISHER_KEY} {shown(key_id)} (trusted publishers: {trusted})"
        )
    unsigned = {k: v for k, v in data.items() if k != "signature"}
    try:
        canonical = canonical_json(unsigned)
    except ValueError as exc:  # allow_nan=False on a value that slipped through
        raise ArtifactIntegrityError(f"{where}: manifest cannot be canonicalised ({exc})") from None
    if not publishers.manifest_signature_valid(key_id, canonical, _decode_signature(signature)):
        raise ArtifactIntegrityError(
            f"{where}: manifest signature does not verify under publisher key {key_id!r}"
        )
    try:
        manifest = Manifest.from_dict(data)
    except ValueError as exc:
        raise ArtifactIntegrityError(f"{where}: malformed manifest ({exc})") from None
    if expected_id is not None and manifest.artifact_id != expected_id:
        raise ArtifactIntegrityError(
            f"{where}: manifest is for a different artifact ({shown(manifest.artifact_id)})"
        )
    object.__setattr__(manifest, "verified", True)
    return manifest


def _decode_signature(text: str) -> bytes:
    """Strict base64; anything else decodes to ``b""``, which no key accepts."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return b""


def verify_payload(payload: bytes, manifest: Manifest) -> None:
    """Size, then SHA-256 (never deserialises anything); raises ``ArtifactIntegrityError``."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    _check_size(len(payload), manifest)  # a wrong size is refused before hashing
    _check_digest(hashlib.sha256(payload).hexdigest(), manifest)


def verify_payload_digest(size: int, sha256_hex: str, manifest: Manifest) -> None:
    """``verify_payload`` for a payload hashed while it streamed: its size, then its SHA-256."""
    _check_size(size, manifest)
    _check_digest(sha256_hex, manifest)


def _check_size(size: int, manifest: Manifest) -> None:
    if size != manifest.size:
        raise ArtifactIntegrityError(
            f"artifact {manifest.artifact_id!r}: payload is {size} bytes, "
            f"manifest says {manifest.size}"
        )


def _check_digest(sha256_hex: str, manifest: Manifest) -> None:
    if not hmac.compare_digest(sha256_hex, manifest.sha256):
        raise ArtifactIntegrityError(
            f"artifact {manifest.artifact_id!r}: payload SHA-256 does not match its manifest"
        )


# What opening a local entry fails with when the entry itself is the problem (a socket, a
# symlink loop), not the store: retrying gives the same answer.
_LOCAL_ENTRY_ERRNOS = frozenset({errno.ENXIO, errno.ELOOP, errno.ENODEV})


def not_a_readable_file(exc: OSError, *, local: bool) -> bool:
    """Whether ``exc``, from opening or reading one store entry, says what the entry is (a
    directory; on a local store also a socket, a symlink loop or a file the process may not
    read) rather than that the store failed: that artifact's problem, not retried.
    ``FileNotFoundError`` and timeouts are answered elsewhere."""
    if isinstance(exc, (FileNotFoundError, TimeoutError)):
        return False
    if isinstance(exc, IsADirectoryError):
        return True
    return local and (isinstance(exc, PermissionError) or exc.errno in _LOCAL_ENTRY_ERRNOS)
