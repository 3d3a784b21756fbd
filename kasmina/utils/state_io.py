"""Atomic, tamper-evident state files: the old version or the new one, never half of one, and
never a byte handed to ``torch.load`` before it is authenticated.

**Atomic.** Every file is written to a temporary name in the same directory, flushed and
fsync'd, then moved over the target with ``os.replace`` (atomic on POSIX and Windows), and the
directory is fsync'd so the rename itself survives a crash.

**Never half a new file either.** A file that must not replace an existing one (a key) is
written the same way and then put in place without overwriting (``install_new_file``). The temp
file of a killed write is garbage; ``remove_stale_temporaries`` removes those of given names
once no live writer can own them.

**Tamper-evident.** A checkpoint written by ``CheckpointSigner`` is one file, a header and then
the payload (the ``torch.save`` bytes)::

    b"KASMCKPT" | manifest length (4 bytes, big-endian) | manifest (canonical JSON) | payload

The manifest holds the format version, the kind (``"epoch"`` or ``"emergency"``), the run id,
the epoch, the payload's size and SHA-256, the creation time, and an HMAC-SHA256 of the
canonical JSON of all those fields under the run's checkpoint key. Why each piece:

- a SHA-256 alone catches accidents, but whoever can rewrite the payload can rewrite its hash;
  the HMAC needs the key (32 random bytes, mode 0600, in the run directory);
- the run id is inside the signed fields, so runs that share a key still cannot restore each
  other's state, and the epoch is, so a file renamed to another epoch's name is refused;
- header and payload live in one file, so the one ``os.replace`` that installs the payload
  installs its manifest too: no crash can pair a manifest with another payload.

Reading verifies, in this order, the magic, the manifest's length bound, strict canonical JSON,
the HMAC (constant time), the fields, the run id, the kind and the epoch, the file's total size,
and the SHA-256 of exactly ``size`` payload bytes; only then do the bytes reach
``torch.load(io.BytesIO(...), weights_only=True)``. Any mismatch raises
``CheckpointIntegrityError``. ``clone_state`` deep-copies the tensors of a nested state so later
training cannot mutate a snapshot.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import logging
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

import torch

from kasmina.errors import CheckpointIntegrityError
from kasmina.utils.files import NotARegularFileError, open_regular_file, read_regular_file
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.locks import lock_exclusive
from kasmina.utils.signed_json import canonical_json, strict_json_loads

__all__ = [
    "CHECKPOINT_KEY_BYTES",
    "CHECKPOINT_MAGIC",
    "CheckpointManifest",
    "CheckpointSigner",
    "atomic_torch_save",
    "atomic_write_bytes",
    "STALE_TEMPORARY_S",
    "clone_state",
    "fsync_directory",
    "install_new_file",
    "load_or_create_checkpoint_key",
    "remove_stale_temporaries",
]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

# The first bytes of every signed checkpoint file.
CHECKPOINT_MAGIC = b"KASMCKPT"
# The version of the header and manifest layout (the "format" field of the manifest).
CHECKPOINT_FILE_FORMAT = 1
# A run's checkpoint key: this many random bytes.
CHECKPOINT_KEY_BYTES = 32
# A manifest is a few hundred bytes; a length field claiming more is damage, not a manifest.
MAX_MANIFEST_BYTES = 4096
_LENGTH_BYTES = 4
_KINDS = ("epoch", "emergency")
_FIELDS = frozenset({"format", "kind", "run_id", "epoch", "size", "sha256", "created", "hmac"})
_HEX = frozenset("0123456789abcdef")
# A temp file untouched this long (seconds) belongs to no live writer: every write here makes
# its file in one go, so a live one is seconds old at most, even for a large checkpoint.
STALE_TEMPORARY_S = 600.0
# ``os.link`` errors that mean "no hard links on this filesystem", not "the link failed".
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Persist a rename, link or unlink in ``directory`` (POSIX); a no-op where directories
    cannot be opened or synced (the files themselves are synced by their writers)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    # Some filesystems refuse fsync on a directory; the file itself is already synced.
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temp file beside ``path``, fsync it, then ``os.replace`` it over
    ``path``. On any failure the temp file is removed, ``path`` is untouched, the error
    propagates."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _through_temporary(target, write, lambda tmp_name: os.replace(tmp_name, target))
    fsync_directory(target.parent)
    return target


def _through_temporary(
    target: Path, write: Callable[[IO[bytes]], None], commit: Callable[[str], _T]
) -> _T:
    """Write a temp file beside ``target`` (``.<name>.<random>.tmp``, mode 0600, the name
    ``remove_stale_temporaries`` knows) with ``write``, fsync it, and return ``commit(path)``
    (which moves or links it into place). The temp file never outlives the call, whatever
    fails, a Ctrl-C included: its creation and its removal hold SIGINT, so neither a signal
    just after the file exists nor a second Ctrl-C during the clean-up leaves it behind."""
    tmp_name: str | None = None
    try:
        with interrupts_deferred():
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
            )
            handle = os.fdopen(fd, "wb")
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        return commit(tmp_name)
    finally:
        if tmp_name is not None:  # gone already when ``commit`` moved it
            with interrupts_deferred(), contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)


def remove_stale_temporaries(
    directory: str | os.PathLike[str],
    final_name: str,
    *,
    older_than_s: float | None = STALE_TEMPORARY_S,
) -> list[Path]:
    """Delete from ``directory`` the temp files (``.<final name>.<random>.tmp``, as every
    writer here names them) of killed writes of files whose names match the regular expression
    ``final_name``; the removed paths. They never replaced their target, so they are garbage
    once no live writer owns them: with ``older_than_s=None`` the caller knows there is none
    (it holds the lock under which these names are written), otherwise only those unmodified
    for ``older_than_s`` seconds go. Failures are logged: a leftover is only disk."""
    temporary = re.compile(rf"\.(?:{final_name})\.[^.]+\.tmp")
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:  # no directory yet (nothing was written), or unreadable: nothing to do
        return removed
    now = time.time()
    for entry in entries:
        if not temporary.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(info.st_mode):
                continue
            if older_than_s is not None and now - info.st_mtime < older_than_s:
                continue  # may be a live writer's
            os.unlink(entry.path)
        except FileNotFoundError:
            continue  # its writer finished (or someone else removed it) meanwhile
        except OSError:
            logger.warning("could not remove the stale temp file %s", entry.path, exc_info=True)
            continue
        logger.warning("removed the temp file of an interrupted write: %s", entry.path)
        removed.append(Path(entry.path))
    return removed


def _replace_if_absent(tmp_name: str, target: Path) -> bool:
    """Where there are no hard links: move ``tmp_name`` to ``target`` unless something is
    there, under an exclusive lock on ``.<name>.lock`` beside it that every writer of
    ``install_new_file`` takes, so two of them cannot both see ``target`` absent. The residual
    window: a writer that bypasses this function, or a platform without advisory locks (not
    POSIX; NFS across hosts where ``flock`` is not forwarded), may still race the check and the
    rename, and then the later rename replaces the earlier file."""
    lock_path = target.with_name(f".{target.name}.lock")
    deadline = time.monotonic() + 30.0
    while (lock := lock_exclusive(lock_path)) is None:
        if time.monotonic() > deadline:  # held for a check and a rename: this is no writer
            raise TimeoutError(f"the install lock {lock_path} stayed held for 30 s")
        time.sleep(0.01)
    with lock:
        try:
            os.lstat(target)
        except FileNotFoundError:
            os.replace(tmp_name, target)
            return True
        return False


def install_new_file(path: str | os.PathLike[str], data: bytes) -> bool:
    """Put ``data`` at ``path`` (mode 0600) unless something is already there (False then,
    nothing written), so that a kill at any point leaves no file at ``path`` or the whole one.

    Why not create ``path`` and write it: a kill between the two leaves a torn file under the
    final name, which then blocks every retry. So the bytes go to a temp file beside ``path``,
    are fsync'd, and only then appear at ``path``: by a hard link, which never overwrites (two
    concurrent writers: exactly one wins), or where the filesystem has none by a rename under a
    lock (``_replace_if_absent``); then the directory is fsync'd. The temp file of a killed
    write is left for ``remove_stale_temporaries``.
    """
    target = Path(path)

    def link(tmp_name: str) -> bool:
        try:
            os.link(tmp_name, target)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
            return _replace_if_absent(tmp_name, target)
        return True

    if not _through_temporary(target, lambda handle: handle.write(data), link):
        return False
    fsync_directory(target.parent)
    return True


def atomic_write_bytes(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> Path:
    """Write ``chunks`` to ``path`` atomically (temp file beside it, fsync, ``os.replace``,
    directory fsync): a crash leaves the old file or the new one, never half of one. Creates
    the parent directory if needed; the file is created with mode 0600."""

    def write(handle: IO[bytes]) -> None:
        for chunk in chunks:
            handle.write(chunk)

    return _atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, unsigned (for files that are never read
    back as trusted state, e.g. a stand-alone monitor's emergency dump). Creates the parent
    directory if needed; a failure leaves the previous file at ``path`` untouched."""
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


# ---------------------------------------------------------------------- checkpoint key


def _read_key(path: Path) -> bytes:
    """The key in ``path``: 32 raw bytes, or 64 hex digits (so ``openssl rand -hex 32`` works)."""
    raw, st = read_regular_file(path, what="checkpoint key")  # never blocks on a FIFO
    if os.name == "posix" and st.st_mode & 0o077:
        logger.warning("checkpoint key %s is readable by group/others; restrict it to 0600", path)
    if len(raw) == CHECKPOINT_KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * CHECKPOINT_KEY_BYTES:
        with contextlib.suppress(ValueError):
            return bytes.fromhex(text.decode("ascii", errors="replace"))
    raise ValueError(
        f"checkpoint key {path} must hold {CHECKPOINT_KEY_BYTES} raw bytes or "
        f"{2 * CHECKPOINT_KEY_BYTES} hex digits, not {len(raw)} bytes"
    )


def load_or_create_checkpoint_key(path: str | os.PathLike[str]) -> bytes:
    """The checkpoint key in ``path``, created on first use (32 random bytes, mode 0600, in a
    parent directory created 0700)."""
    target = Path(path).expanduser()
    with contextlib.suppress(FileNotFoundError):
        return _read_key(target)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    remove_stale_temporaries(target.parent, re.escape(target.name))  # of killed creations
    key = secrets.token_bytes(CHECKPOINT_KEY_BYTES)
    # Installed whole or not at all, never over a key a concurrent creator of the run put
    # there first (then that key is read and used).
    if install_new_file(target, key):
        logger.info("created checkpoint key %s", target)
        return key
    return _read_key(target)


# ---------------------------------------------------------------------- signed checkpoints


@dataclass(frozen=True)
class CheckpointManifest:
    """The verified fields of a checkpoint's manifest (the HMAC itself is not kept)."""

    format: int
    kind: str
    run_id: str
    epoch: int | None
    size: int
    sha256: str
    created: float


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_hex(value: object, length: int) -> bool:
    """Whether ``value`` is a string of ``length`` lower-case hex digits (a digest, an HMAC)."""
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def _check_epoch_arg(kind: str, epoch: int | None) -> None:
    if kind not in _KINDS:
        raise ValueError(f"checkpoint kind must be one of {_KINDS}, got {kind!r}")
    valid = epoch is None or (_is_int(epoch) and epoch >= 0)
    if not valid or (kind == "epoch" and epoch is None):
        need = "an int >= 0" if kind == "epoch" else "None or an int >= 0"
        raise ValueError(f"a {kind} checkpoint's epoch must be {need}, got {epoch!r}")


class CheckpointSigner:
    """Writes and verifies one run's checkpoint files (see the module docstring).

    The key is read from ``key_path``, or created there (0600), on first use rather than at
    construction, so a run that never writes a checkpoint leaves no key behind. ``key`` may be
    given directly instead (then ``key_path`` is only named in messages). Never shows the key in
    its ``repr``.
    """

    def __init__(
        self, key_path: str | os.PathLike[str], run_id: str, *, key: bytes | None = None
    ) -> None:
        if not isinstance(run_id, str) or not run_id:
            raise ValueError(f"run_id must be a non-empty string, got {run_id!r}")
        if key is not None and (not isinstance(key, bytes) or len(key) < CHECKPOINT_KEY_BYTES):
            raise ValueError(f"a checkpoint key must be at least {CHECKPOINT_KEY_BYTES} bytes")
        self.key_path = Path(key_path).expanduser()
        self.run_id = run_id
        self._key = key
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CheckpointSigner(run_id={self.run_id!r}, key_path={str(self.key_path)!r})"

    @property
    def key(self) -> bytes:
        """The key, read or created on first use (for writing)."""
        with self._lock:
            if self._key is None:
                self._key = load_or_create_checkpoint_key(self.key_path)
            return self._key

    def _verifying_key(self, where: str) -> bytes:
        """The key for a read: never created, since a fresh key verifies nothing."""
        with self._lock:
            if self._key is None:
                try:
                    self._key = _read_key(self.key_path)
                except FileNotFoundError:
                    raise CheckpointIntegrityError(
                        f"{where}: no checkpoint key at {self.key_path}, so nothing this run "
                        "could have signed"
                    ) from None
            return self._key

    # ------------------------------------------------------------------ writing
    def seal(
        self, payload: bytes | bytearray | memoryview, *, kind: str, epoch: int | None
    ) -> bytes:
        """The header (magic, length, signed manifest) that goes in front of ``payload``."""
        _check_epoch_arg(kind, epoch)
        fields: dict[str, Any] = {
            "format": CHECKPOINT_FILE_FORMAT,
            "kind": kind,
            "run_id": self.run_id,
            "epoch": epoch,
            "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "created": time.time(),
        }
        fields["hmac"] = self._mac(fields, self.key)
        manifest = canonical_json(fields)
        return CHECKPOINT_MAGIC + len(manifest).to_bytes(_LENGTH_BYTES, "big") + manifest

    def write_payload(
        self,
        payload: bytes | bytearray | memoryview,
        path: str | os.PathLike[str],
        *,
        kind: str = "epoch",
        epoch: int | None = None,
    ) -> Path:
        """Write ``payload`` (``torch.save`` bytes) behind its signed header, atomically."""
        header = self.seal(payload, kind=kind, epoch=epoch)

        def write(handle: IO[bytes]) -> None:
            handle.write(header)
            handle.write(payload)

        return _atomic_write(path, write)

    def write(
        self,
        obj: Any,
        path: str | os.PathLike[str],
        *,
        kind: str = "epoch",
        epoch: int | None = None,
    ) -> Path:
        """``torch.save`` ``obj`` into memory, then ``write_payload`` it: the hash and size go
        in the header, which is written first, so the bytes must exist before the file does."""
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        return self.write_payload(buffer.getbuffer(), path, kind=kind, epoch=epoch)

    # ------------------------------------------------------------------ reading
    def read_payload(
        self, path: str | os.PathLike[str], *, kind: str = "epoch", epoch: int | None = None
    ) -> tuple[CheckpointManifest, bytes]:
        """The verified manifest and payload bytes of ``path``; raises
        ``CheckpointIntegrityError`` on any mismatch (see the module docstring for the order).
        ``epoch`` is the epoch the caller expects (``None`` for an emergency checkpoint)."""
        _check_epoch_arg(kind, epoch)
        where = f"checkpoint {path}"
        # Non-blocking open and a regular-file check: a FIFO or device planted under a
        # checkpoint's name must be refused, not block or stream forever.
        try:
            handle = open_regular_file(path, what="checkpoint")
        except NotARegularFileError as exc:
            raise CheckpointIntegrityError(f"{where}: not a regular file ({exc.kind})") from None
        with handle:
            head = handle.read(len(CHECKPOINT_MAGIC) + _LENGTH_BYTES)
            if len(head) < len(CHECKPOINT_MAGIC) + _LENGTH_BYTES:
                raise CheckpointIntegrityError(f"{where}: truncated before its manifest")
            if head[: len(CHECKPOINT_MAGIC)] != CHECKPOINT_MAGIC:
                raise CheckpointIntegrityError(f"{where}: not a signed Kasmina checkpoint")
            length = int.from_bytes(head[len(CHECKPOINT_MAGIC) :], "big")
            if length > MAX_MANIFEST_BYTES:
                raise CheckpointIntegrityError(
                    f"{where}: manifest length {length} exceeds {MAX_MANIFEST_BYTES} bytes"
                )
            raw = handle.read(length)
            if len(raw) != length:
                raise CheckpointIntegrityError(f"{where}: truncated inside its manifest")
            manifest = self._verify_manifest(raw, where)
            self._check_identity(manifest, kind, epoch, where)
            offset = len(head) + length
            on_disk = os.fstat(handle.fileno()).st_size - offset
            if on_disk != manifest.size:
                raise CheckpointIntegrityError(
                    f"{where}: payload is {on_disk} bytes, its manifest says {manifest.size} "
                    "(truncated or extended)"
                )
            payload = handle.read(manifest.size)
            if len(payload) != manifest.size or handle.read(1):
                raise CheckpointIntegrityError(f"{where}: payload changed size while read")
        if not hmac.compare_digest(hashlib.sha256(payload).hexdigest(), manifest.sha256):
            raise CheckpointIntegrityError(f"{where}: payload SHA-256 does not match its manifest")
        return manifest, payload

    def read(
        self,
        path: str | os.PathLike[str],
        *,
        kind: str = "epoch",
        epoch: int | None = None,
        map_location: Any = None,
    ) -> Any:
        """Verify ``path`` (``read_payload``), then ``torch.load`` the verified bytes with
        ``weights_only=True`` (tensors and plain containers only)."""
        _, payload = self.read_payload(path, kind=kind, epoch=epoch)
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)

    # ------------------------------------------------------------------ internals
    def _mac(self, fields: Mapping[str, Any], key: bytes) -> str:
        unsigned = {k: v for k, v in fields.items() if k != "hmac"}
        return hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()

    def _verify_manifest(self, raw: bytes, where: str) -> CheckpointManifest:
        try:
            data = strict_json_loads(raw.decode("ascii"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointIntegrityError(f"{where}: manifest is not valid JSON ({exc})") from None
        if not isinstance(data, dict) or not is_hex(data.get("hmac"), 64):
            raise CheckpointIntegrityError(f"{where}: manifest carries no HMAC")
        try:
            canonical = canonical_json(data)
            expected = self._mac(data, self._verifying_key(where))
        except (TypeError, ValueError) as exc:
            raise CheckpointIntegrityError(f"{where}: manifest is malformed ({exc})") from None
        # Only one encoding of a manifest is accepted, so its bytes and its fields correspond.
        if canonical != raw or not hmac.compare_digest(expected, data["hmac"]):
            raise CheckpointIntegrityError(
                f"{where}: manifest HMAC does not verify (the file was altered, or it was "
                f"signed by another key than {self.key_path})"
            )
        if (
            set(data) != _FIELDS
            or data["format"] != CHECKPOINT_FILE_FORMAT
            or data["kind"] not in _KINDS
            or not isinstance(data["run_id"], str)
            or not (data["epoch"] is None or (_is_int(data["epoch"]) and data["epoch"] >= 0))
            or not (_is_int(data["size"]) and data["size"] >= 0)
            or not is_hex(data["sha256"], 64)
            or not isinstance(data["created"], (int, float))
        ):
            raise CheckpointIntegrityError(
                f"{where}: manifest is signed but not of format {CHECKPOINT_FILE_FORMAT}"
            )
        return CheckpointManifest(
            format=data["format"],
            kind=data["kind"],
            run_id=data["run_id"],
            epoch=data["epoch"],
            size=data["size"],
            sha256=data["sha256"],
            created=float(data["created"]),
        )

    def _check_identity(
        self, manifest: CheckpointManifest, kind: str, epoch: int | None, where: str
    ) -> None:
        if manifest.run_id != self.run_id:
            raise CheckpointIntegrityError(
                f"{where}: belongs to run {manifest.run_id!r}, not to this run {self.run_id!r}"
            )
        if manifest.kind != kind or manifest.epoch != epoch:
            raise CheckpointIntegrityError(
                f"{where}: holds the {manifest.kind} checkpoint of epoch {manifest.epoch}, "
                f"expected the {kind} checkpoint of epoch {epoch}"
            )


def clone_state(value: Any, device: torch.device | str | None = None) -> Any:
    """Deep copy of nested dicts/lists/tuples, cloning tensors (detached; onto ``device`` when
    given) and keeping scalars."""
    if isinstance(value, torch.Tensor):
        if device is None:
            return value.detach().clone()
        return value.detach().to(device, copy=True)
    if isinstance(value, Mapping):
        return {key: clone_state(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [clone_state(item, device) for item in value]
    if isinstance(value, tuple):
        return tuple(clone_state(item, device) for item in value)
    return value


def cast_in_place(module: torch.nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Give each floating parameter or buffer of ``module`` named in ``dtypes`` that dtype,
    tensor by tensor (a model may mix dtypes); ``.data`` keeps each tensor object."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name in dtypes and t.is_floating_point() and t.dtype != dtypes[name]:
            t.data = t.data.to(dtypes[name])
