"""Atomic, tamper-evident state files: the old version or the new one, never half of one, and
never a byte handed to ``torch.load`` before it is authenticated.

**Atomic.** Every file is written through ``kasmina.utils.atomic`` (a temp file beside it,
fsync'd, moved into place with ``os.replace``; a key put in place without overwriting).

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
import copy
import hashlib
import hmac
import io
import logging
import numbers
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from kasmina.errors import CheckpointIntegrityError, NotARegularFileError
from kasmina.utils.atomic import atomic_write, install_new_file, remove_stale_temporaries_of
from kasmina.utils.files import open_regular_file, read_regular_file
from kasmina.utils.locks import fork_safe
from kasmina.utils.signed_json import canonical_json, finite_number, strict_json_loads

__all__ = [
    "CHECKPOINT_KEY_BYTES",
    "CHECKPOINT_MAGIC",
    "CheckpointManifest",
    "CheckpointSigner",
    "atomic_torch_save",
    "check_checkpoint_key",
    "clone_state",
    "load_or_create_checkpoint_key",
]

logger = logging.getLogger(__name__)

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


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically, unsigned (for files that are never read
    back as trusted state, e.g. a stand-alone monitor's emergency dump). Creates the parent
    directory if needed; a failure leaves the previous file at ``path`` untouched."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


# ---------------------------------------------------------------------- checkpoint key


def _read_key(path: Path) -> bytes:
    """The key in ``path``: 32 raw bytes, or 64 hex digits (so ``openssl rand -hex 32`` works)."""
    raw, st = read_regular_file(path, what="checkpoint key")  # never blocks on a FIFO
    if os.name == "posix" and st.st_mode & 0o077:  # a secret mount's fixed mode: warned
        logger.warning(
            "checkpoint key %s is accessible by group/others (mode %04o): anyone who reads it "
            "can forge the run's checkpoints; restrict it to 0600",
            path,
            st.st_mode & 0o777,
        )
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


def check_checkpoint_key(path: str | os.PathLike[str]) -> None:
    """``ValueError`` now if ``path`` exists and holds no checkpoint key (a keyring's JSON
    named by mistake failed the first end_epoch, after a whole epoch of training)."""
    with contextlib.suppress(FileNotFoundError):
        _read_key(Path(path).expanduser())


def load_or_create_checkpoint_key(path: str | os.PathLike[str]) -> bytes:
    """The checkpoint key in ``path``, created on first use (32 random bytes, mode 0600, in a
    parent directory created 0700)."""
    target = Path(path).expanduser()
    # Killed creations' temp files, also once the key exists: a creation killed between
    # linking the key into place and unlinking its temp name left a second link to the key.
    remove_stale_temporaries_of(target)
    with contextlib.suppress(FileNotFoundError):
        return _read_key(target)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        self._lock = fork_safe(threading.Lock())

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

        return atomic_write(path, write)

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
            or not finite_number(data["created"])
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


def clone_state(
    value: Any, device: torch.device | str | None = None, *, keep_meta: bool = False
) -> Any:
    """Deep copy of nested dicts/lists/tuples, cloning tensors (detached; onto ``device`` when
    given) and keeping scalars, a NumPy scalar or a ``Fraction`` as the Python number it equals
    (``plain_number``). A module ``state_dict``'s ``_metadata`` (each module's format
    version) is kept: without it ``load_state_dict`` reads the state as the oldest format (a
    quantized ``Linear`` then looks for a ``weight`` key it no longer has). ``keep_meta``: a
    tensor on ``meta`` (no data to copy, which a move to ``device`` raises on) stays there, as
    a clone keeps it: a training snapshot holds it as the live model does."""
    if isinstance(value, torch.Tensor):
        if device is None or (keep_meta and value.is_meta):
            return value.detach().clone()
        return value.detach().to(device, copy=True)
    if isinstance(value, Mapping):
        copied = {
            key: clone_state(item, device, keep_meta=keep_meta) for key, item in value.items()
        }
        return with_metadata_of(value, copied)
    if isinstance(value, list):
        return [clone_state(item, device, keep_meta=keep_meta) for item in value]
    if isinstance(value, tuple):
        return tuple(clone_state(item, device, keep_meta=keep_meta) for item in value)
    return plain_number(value)


def unsaveable(value: Any) -> str | None:
    """Why a checkpoint read with ``torch.load(weights_only=True)`` would refuse ``value`` (a
    NumPy array, a deque, a slice, a function), or None. Asked of this torch itself, not of a
    list of types (bytes, a set, a device are read): ``value``'s structure, its tensors left out
    (their data is never the problem) and its numbers as a checkpoint writes them
    (``plain_number``), is saved and read back. A structure that cannot be walked (one that
    holds itself) is named too, never raised: a checkpoint skipped, not a step stopped."""
    try:
        plain = _without_tensors(value)
    except RecursionError:
        return "a structure nested too deep to save (does it hold itself?)"
    return _reads_back(plain)


def unreadable_entry(state: Mapping[str, Any]) -> str | None:
    """``"<key>: <why>"`` for the first entry of ``state`` (a ``state_dict``) that
    :func:`unsaveable` names, or None: the whole is asked once, and only when it fails each
    entry, to name it. A module's ``get_extra_state`` may return anything ``torch.save`` takes
    (a NumPy array): such a file is written, and never read back."""
    if unsaveable(dict(state)) is None:
        return None
    for key, value in state.items():
        problem = unsaveable(value)
        if problem is not None:
            return f"{key}: {problem}"
    return "its structure does not read back"  # (only a whole that no part explains)


def _without_tensors(value: Any) -> Any:
    """``value`` with every tensor in its dicts, lists and tuples replaced by None, and each
    number as a checkpoint writes it (``clone_state``: ``plain_number``)."""
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, Mapping):
        return {key: _without_tensors(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_without_tensors(item) for item in value)
    return plain_number(value)


def _reads_back(value: Any) -> str | None:
    """Why ``value`` does not come back through ``torch.save`` and ``torch.load(weights_only=
    True)``, or None."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    except Exception as exc:  # whatever either refuses: the reason is reported, cut
        lines = str(exc).splitlines() or [""]
        mark = "WeightsUnpickler error:"  # torch's own reason, after its advice on loading it
        why = next((line.split(mark, 1)[1] for line in lines if mark in line), lines[0])
        why = why.split(". Please use", 1)[0]  # (its advice: to trust the file)
        return f"{type(exc).__name__}: {why.strip()[:200]}"
    return None


def plain_number(value: Any) -> Any:
    """A NumPy scalar (``np.float64``: a learning rate a schedule computed with ``np.cos``) as
    its Python number, another real number type (``Fraction``) as a float; anything else as it
    is (an ``IntEnum`` stays itself). A checkpoint is read with ``weights_only=True``, which
    refuses both: one such value in an optimizer's options made every rollback fail."""
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        item = value.item()
        return float(item) if type(item).__module__ == "numpy" else item  # a longdouble's
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value


def with_metadata_of(source: Mapping[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """``state``, as an ``OrderedDict`` carrying a copy of ``source``'s ``_metadata`` (a module
    ``state_dict``'s format versions) when ``source`` has one; else ``state`` itself."""
    metadata = getattr(source, "_metadata", None)
    if metadata is None:
        return state
    state = OrderedDict(state)
    state._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return state


def load_mismatch(
    root: torch.nn.Module, key: str, live: object, state: Mapping[str, Any]
) -> tuple[str, object] | None:
    """What loading ``state[key]`` over ``root``'s tensor ``live`` would get wrong, or None:
    ``("shape", got)`` (the saved value's shape, or its type when it is no tensor) unless the
    owner resizes it as it loads (``resized_on_load``), or ``("dtype", saved dtype)``, which a
    load would cast silently. A ``live`` value that is no tensor is never wrong."""
    if not isinstance(live, torch.Tensor):
        return None
    value = state[key]
    if not isinstance(value, torch.Tensor):
        return "shape", type(value).__name__
    if value.shape != live.shape and not resized_on_load(root, key, state):
        return "shape", tuple(value.shape)
    if value.dtype != live.dtype:
        return "dtype", value.dtype
    return None


def other_shapes(root: torch.nn.Module, state: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``"key: saved [...], live [...]"`` for each of ``root``'s tensors that ``state`` holds
    (under ``prefix``) with another shape, which torch would refuse only after loading the
    modules before it: not a lazy parameter (it takes any shape), nor one its module resizes as
    it loads (``resized_on_load``: a per-channel QAT observer's)."""
    live = root.state_dict(keep_vars=True)
    lazy = torch.nn.parameter.is_lazy
    differ = [
        key for key, tensor in live.items()
        if isinstance(tensor, torch.Tensor) and not lazy(tensor)
        and isinstance(saved := state.get(prefix + key), torch.Tensor)
        and saved.shape != tensor.shape
    ]  # fmt: skip
    if not differ:
        return []
    local = _under(state, prefix)
    return [
        f"{prefix}{key}: saved {list(local[key].shape)}, live {list(live[key].shape)}"
        for key in differ
        if not resized_on_load(root, key, local)
    ]


def resized_on_load(root: torch.nn.Module, key: str, state: Mapping[str, Any]) -> bool:
    """Whether loading ``state`` (``root``'s keys) gives ``key`` the shape ``state`` holds for
    it although ``root``'s tensor has another: a tensor its module resizes as it loads (a QAT
    ``FakeQuantize``'s scale and zero point, an observer's min and max: one element until the
    first forward, per channel after). Tried on a copy of that module; ``root`` is untouched.
    A module with the default loader never resizes: False without a copy."""
    owner_name, _, leaf = key.rpartition(".")
    try:
        owner = root.get_submodule(owner_name)
    except AttributeError:
        return False
    if type(owner)._load_from_state_dict is torch.nn.Module._load_from_state_dict:
        return False
    local = _under(state, f"{owner_name}." if owner_name else "")
    trial = copy.deepcopy(owner)
    try:
        trial.load_state_dict(local, strict=True)
        loaded = trial.state_dict()[leaf]
    except Exception:  # it does not load there either: the mismatch stands
        return False
    wanted = state[key]
    return isinstance(wanted, torch.Tensor) and loaded.shape == wanted.shape


def _under(state: Mapping[str, Any], prefix: str) -> OrderedDict[str, Any]:
    """The entries of ``state`` under ``prefix`` (a module's path and a dot, or ""), keyed from
    there, with the modules' versions (``_metadata``, keyed by module path) made relative too:
    what that module's own ``load_state_dict`` takes."""
    local = OrderedDict((k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))
    metadata, at = getattr(state, "_metadata", None), prefix[:-1]
    if metadata is not None:
        local._metadata = {  # type: ignore[attr-defined]
            m[len(prefix) :] if m != at else "": v
            for m, v in metadata.items()
            if m == at or m.startswith(prefix)
        }
    return local


def cast_in_place(module: torch.nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Give each floating parameter or buffer of ``module`` named in ``dtypes`` that dtype,
    tensor by tensor (a model may mix dtypes); ``.data`` keeps each tensor object."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if name in dtypes and t.is_floating_point() and t.dtype != dtypes[name]:
            t.data = t.data.to(dtypes[name])


def in_saved_dtypes(module: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Give each floating tensor of ``module`` the dtype ``state`` (its saved ``state_dict``)
    holds it in: a kernel rebuilt from its artifact is in the artifact's dtype, and a model
    moved to another dtype after it grew (its kernels with it) saved them in that one, which
    ``load_state_dict`` alone would cast back."""
    live = module.state_dict()
    saved = {k: v.dtype for k, v in state.items() if isinstance(v, torch.Tensor)}
    if all(isinstance(live.get(k), torch.Tensor) and live[k].dtype == d for k, d in saved.items()):
        return  # as saved: a tensor outside the state (a float64 constant) keeps its own dtype
    floating = {d for d in saved.values() if d.is_floating_point}
    if len(floating) == 1:  # the usual case: the whole module, constants and buffers included
        module.to(floating.pop())
        return
    cast_in_place(module, {k: dtype for k, dtype in saved.items() if dtype.is_floating_point})
