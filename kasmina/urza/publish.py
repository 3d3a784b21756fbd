"""Publishing artifacts to an Urza store (the write side of ``kasmina.urza.client``).

``publish_artifact`` exports a module with ``torch.export``, saves it as ``.pt2`` and writes it
with a manifest signed by the publisher's Ed25519 key (a ``PublisherKey``: only publishers hold
one); ``publish_payload`` does the same for bytes that are already a saved program. The
manifest claims the id first (it appears whole, and on a local filesystem only if the name is
free), then the payload is written through a temporary name and a rename: two publishers of one
id never leave one's manifest beside the other's payload, and until the payload lands a reader
finds the artifact missing. On a local filesystem both writes are ``kasmina.utils.atomic``'s
(fsync'd, create-only by a hard link or under a lock, the temporaries of a killed publish
removed by the next one); other stores get fsspec's writes and a rename.

``resign_artifact`` signs an artifact's manifest again with another publisher key: one signed
with the retired HMAC scheme (manifest version 1), checked with the old keyring, or one signed
by a publisher key being retired (a rotation), checked with its public key. The payload is
checked against the manifest, and only then are the same fields signed with the new key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from kasmina.errors import ArtifactIntegrityError
from kasmina.urza.aliasing import module_tensors, overlaps, with_parameter
from kasmina.urza.artifact import (
    MANIFEST_SUFFIX,
    MANIFEST_VERSION,
    MAX_MANIFEST_BYTES,
    PAYLOAD_SUFFIX,
    READ_CHUNK_BYTES,
    Manifest,
    TensorSpec,
    open_store,
    payload_sha256,
    read_bounded,
    sign_manifest,
    validate_artifact_id,
    verify_manifest,
    verify_payload_digest,
)
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.redaction import redact_urls
from kasmina.utils.atomic import atomic_write_bytes, install_new_file, remove_stale_temporaries_of
from kasmina.utils.keyring import Keyring
from kasmina.utils.signed_json import canonical_json, strict_json_loads

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

__all__ = [
    "default_artifact_id",
    "export_module",
    "export_payload",
    "publish_artifact",
    "publish_payload",
    "resign_artifact",
]

# Re-signing reads the whole payload to check it; a kernel is far smaller than this.
MAX_RESIGN_PAYLOAD_BYTES = 1 << 30


def export_module(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], *, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` a module. With ``dynamic`` every dimension is ``Dim.AUTO``: dimensions
    the module does not pin (batch, sequence) stay dynamic; sizes 0 and 1 specialise, so give
    example inputs with at least 2 along each dimension meant to vary. A batch of 1 (the first
    dimension of an input of two or more) is refused under ``dynamic``: the kernel would take
    batches of 1 only. So is a module two of whose parameters and buffers share memory
    (``kasmina.urza.aliasing``), a parameter among them."""
    if isinstance(example_inputs, torch.Tensor):  # iterable too: it would be split into rows
        raise TypeError(
            "example_inputs must be a sequence of tensors, one per input of the module: "
            "pass [x], not x"
        )
    if not isinstance(dynamic, bool):  # "false" would be truthy
        raise TypeError(f"dynamic must be a bool, got {type(dynamic).__name__} {dynamic!r:.40}")
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a non-empty sequence of tensors")
    for i, t in enumerate(inputs):
        if dynamic and t.dim() > 1 and t.shape[0] == 1:
            raise ValueError(
                f"example input {i} has a batch of 1 (shape {tuple(t.shape)}): torch.export "
                "fixes a size of 1, so the kernel would take batches of 1 only; give a batch "
                "of 2 or more (or dynamic=False for a kernel of this exact shape)"
            )
    # Buffers over one storage (a lookup table and a view of it) stay shared in a seed's copy.
    pairs = overlaps(module_tensors(module))
    found = next((o for o, a, b in pairs if o.same or with_parameter(a, b)), None)
    if found is not None:
        shared = found
        what = "are one tensor" if shared.same else "share memory"
        raise ValueError(
            f"{shared.first!r} and {shared.second!r} {what} (tied weights, a submodule used "
            "twice, a buffer that is a view of a parameter): a seed trains a copy of the "
            "loaded program, where tied parameters come apart and a buffer viewing a parameter "
            "cannot be copied, so it would not train the model published; give each its own "
            "tensor, or compute one from the other in forward"
        )
    shapes = None
    if dynamic:
        shapes = tuple({d: torch.export.Dim.AUTO for d in range(t.dim())} for t in inputs)
    return torch.export.export(module, inputs, dynamic_shapes=shapes)


def _input_spec(program: torch.export.ExportedProgram) -> tuple[TensorSpec, ...]:
    names = set(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta["val"]
            shape = tuple(int(d) if is_concrete_int(d) else None for d in val.shape)
            specs.append(TensorSpec(shape, str(val.dtype).removeprefix("torch.")))
    return tuple(specs)


def default_artifact_id(blueprint: str, sha256: str) -> str:
    """``<blueprint, sanitised>-<first 16 hex digits of the payload hash>``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", blueprint).lstrip("._-")[:100] or "artifact"
    return f"{name}-{sha256[:16]}"


def publish_artifact(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    store_url: str,
    blueprint: str,
    publisher: PublisherKey,
    artifact_id: str | None = None,
    *,
    dynamic: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Export ``module`` (in its current train/eval mode: dropout and batch norm keep the
    behaviour they had at export), save it as ``.pt2`` and publish it signed by ``publisher``:
    ``export_payload``, then ``publish_payload``.
    """
    _require_publisher(publisher)
    payload, input_spec = export_payload(module, example_inputs, dynamic=dynamic)
    return publish_payload(
        payload,
        store_url,
        blueprint,
        publisher,
        artifact_id,
        input_spec=input_spec,
        storage_options=storage_options,
    )


def export_payload(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], *, dynamic: bool = True
) -> tuple[bytes, tuple[TensorSpec, ...]]:
    """``module`` exported (``export_module``) and saved as ``.pt2`` bytes, with the input spec
    its manifest records: what ``publish_payload`` takes. Nothing is written or signed, so a
    caller can tell the export's failures (the module's own code, traced) from the store's."""
    program = export_module(module, example_inputs, dynamic=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue(), _input_spec(program)


def publish_payload(
    payload: bytes,
    store_url: str,
    blueprint: str,
    publisher: PublisherKey,
    artifact_id: str | None = None,
    *,
    input_spec: Sequence[TensorSpec] = (),
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Write already-saved ``.pt2`` bytes and their manifest, signed by ``publisher``.

    Publishing is idempotent for identical bytes from the same publisher; an existing id with
    a different payload, or whose manifest this publisher's key does not verify (another
    publisher's, or a retired HMAC one), raises ``FileExistsError``: a published artifact never
    changes under its id.

    Two publishers of one id at once: the manifest claims the id before the payload is written
    (it appears whole, and on a local filesystem only if the name is free: ``_claim``), so one
    of them gets the id and the other finds it taken (the same bytes: done; other bytes:
    ``FileExistsError``), and no store is left with one publisher's manifest beside the
    other's payload. Until the payload lands a reader finds the artifact missing. A publish
    that stopped between the two writes is finished by publishing the same bytes again; one
    whose payload write fails (a full disk, a directory where the payload goes) removes the
    manifest it wrote, if it is still its own, before it raises. Other filesystems are
    checked, then written: complete, but not exclusive. On a local filesystem the temporaries
    a killed publish of this id left are removed first, once old enough to be no live one's.
    """
    _require_publisher(publisher)
    if not isinstance(blueprint, str) or not blueprint:
        raise ValueError("blueprint must be a non-empty string")
    sha256 = payload_sha256(payload)
    if artifact_id is None:  # given, even empty, an id is never replaced by a generated one
        artifact_id = default_artifact_id(blueprint, sha256)
    artifact_id = validate_artifact_id(artifact_id)
    manifest = sign_manifest(
        Manifest(
            artifact_id=artifact_id,
            blueprint=blueprint,
            sha256=sha256,
            size=len(payload),
            input_spec=tuple(input_spec),
            key_id=publisher.key_id,
            created=time.time(),
            torch_version=torch.__version__,
        ),
        publisher,
    )
    own = publisher.trusted_publishers()
    fs, root = open_store(store_url, storage_options)
    manifest_path = f"{root}/{artifact_id}{MANIFEST_SUFFIX}"
    payload_path = f"{root}/{artifact_id}{PAYLOAD_SUFFIX}"
    fs.makedirs(root, exist_ok=True)
    _remove_stale_temporaries(fs, manifest_path, payload_path)
    claimed = _claim(fs, manifest_path, manifest.to_json())
    if not claimed:
        existing = _existing_manifest(fs, manifest_path, own, artifact_id, publisher.key_id)
        if existing.sha256 != sha256:
            raise FileExistsError(
                f"artifact {artifact_id!r} already exists with a different payload"
            )
        if _holds(fs, payload_path, existing):
            logger.info("artifact %s already published with identical payload", artifact_id)
            return existing
        manifest = existing  # ours, its payload never written or damaged: write it again
    try:
        _atomic_write(fs, payload_path, bytes(payload))
    except BaseException:
        if claimed:  # the id is free again, not held by a manifest with no payload
            _unclaim(fs, manifest_path, manifest.to_json())
        raise
    where = redact_urls(store_url)  # a store URL's credentials reach no log
    logger.info("published artifact %s (%d bytes) to %s", artifact_id, len(payload), where)
    return verify_manifest(manifest.to_json(), own, expected_id=artifact_id)


def _claim(fs: Any, path: str, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (False then), appearing whole. On a
    local filesystem ``install_new_file``: fsync'd, given its name by a hard link (refused if
    the name exists) or, without hard links, by a rename under the lock every installer takes;
    exclusive either way. Elsewhere written under a temporary name, checked, then renamed:
    complete, but not exclusive."""
    if isinstance(fs, LocalFileSystem):
        return _naming(path, lambda: install_new_file(path, data, private=False))

    def move(tmp: str) -> bool:
        if fs.exists(path):
            return False
        fs.mv(tmp, path)
        return True

    return _through_temporary(fs, path, data, move)


def _unclaim(fs: Any, path: str, data: bytes) -> None:
    """Remove the manifest ``_claim`` wrote at ``path`` if it still holds ``data`` (best
    effort: what stopped the payload may stop this too, and a publish again finishes it)."""
    with contextlib.suppress(Exception):
        if read_bounded(fs, path, len(data), what="own manifest", why="its bytes") == data:
            fs.rm(path)


def _existing_manifest(
    fs: Any, path: str, own: TrustedPublishers, artifact_id: str, key_id: str
) -> Manifest:
    """The manifest already at ``path``, verified with this publisher's key, or
    ``FileExistsError`` (another publisher's id, or not a manifest this key signed)."""
    try:
        raw = read_bounded(
            fs,
            path,
            MAX_MANIFEST_BYTES,
            what=f"artifact {artifact_id!r}: existing manifest",
            why="MAX_MANIFEST_BYTES",
        )
        return verify_manifest(raw, own, expected_id=artifact_id)
    except ArtifactIntegrityError as exc:
        raise FileExistsError(
            f"artifact {artifact_id!r} already exists and publisher key {key_id!r} does not "
            f"verify it ({exc}); choose another artifact id"
        ) from None


def _holds(fs: Any, path: str, manifest: Manifest) -> bool:
    """Whether ``path`` holds the payload ``manifest`` describes, its size and SHA-256 checked
    as a fetch checks them (read bounded, hashed as it streams): a payload of the right size
    whose bytes were damaged is written again (a size check alone reported it published)."""
    hasher = hashlib.sha256()
    what = f"artifact {manifest.artifact_id!r}: stored payload"
    try:
        data = read_bounded(fs, path, manifest.size, what=what, why="its manifest", hasher=hasher)
        verify_payload_digest(len(data), hasher.hexdigest(), manifest)
    except (FileNotFoundError, ArtifactIntegrityError):
        return False
    return True


def resign_artifact(
    store_url: str,
    artifact_id: str,
    publisher: PublisherKey,
    old_keys: Keyring | TrustedPublishers,
    *,
    storage_options: dict[str, Any] | None = None,
    max_payload_bytes: int = MAX_RESIGN_PAYLOAD_BYTES,
) -> Manifest:
    """Re-sign an artifact's manifest with ``publisher``'s Ed25519 key, in place: a version 1
    (HMAC) manifest whose signature verifies under the ``Keyring`` ``old_keys`` (the keys the
    old manifests were signed with: the migration), or a version 2 manifest that verifies
    under the ``TrustedPublishers`` ``old_keys`` (a retiring publisher's public key: a key
    rotation, which keeps the artifact's id, so checkpoints that name it still resume).

    Nothing is signed on trust: the old signature must verify, and the payload's size and
    SHA-256 must match the manifest, before the same fields are signed by ``publisher`` and
    written over the old manifest (through a temporary name and a rename). A manifest that
    already verifies under ``publisher`` is returned unchanged once its payload is checked the
    same way (so a whole store can be re-signed twice, and a corrupt payload fails either way);
    one neither key verifies is not touched. Any failed check raises
    ``ArtifactIntegrityError`` (``FileNotFoundError`` for a missing artifact) and leaves the
    store as it was. Returns the verified new manifest.
    """
    _require_publisher(publisher)
    if not isinstance(old_keys, Keyring | TrustedPublishers):
        raise TypeError(
            "old_keys must be the Keyring the old HMAC manifests were signed with, or the "
            "TrustedPublishers of the publisher key being retired"
        )
    validate_artifact_id(artifact_id)
    fs, root = open_store(store_url, storage_options)
    where = redact_urls(store_url)  # its credentials reach no error
    manifest_path = f"{root}/{artifact_id}{MANIFEST_SUFFIX}"
    what = f"artifact {artifact_id!r}"
    try:
        raw = read_bounded(
            fs,
            manifest_path,
            MAX_MANIFEST_BYTES,
            what=f"{what}: manifest",
            why="MAX_MANIFEST_BYTES",
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"no artifact {artifact_id!r} in {where}") from None
    own = publisher.trusted_publishers()
    try:
        data = strict_json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        data = None
    if isinstance(data, dict) and "manifest_version" in data:
        try:
            current = verify_manifest(raw, own, expected_id=artifact_id)
        except ArtifactIntegrityError:
            if not isinstance(old_keys, TrustedPublishers):
                raise  # another publisher's, and no retiring key was given
            legacy = verify_manifest(raw, old_keys, expected_id=artifact_id)  # raises if not
        else:
            _check_payload(fs, root, current, max_payload_bytes, where)
            logger.info("artifact %s is already signed by %s", artifact_id, publisher.key_id)
            return current
    elif isinstance(old_keys, Keyring):
        legacy = _verify_legacy_manifest(raw, old_keys, artifact_id)
    else:
        raise ArtifactIntegrityError(
            f"{what}: its manifest is not a version 2 manifest a retiring publisher signed "
            "(a version 1 HMAC manifest is re-signed with the keyring it was signed with)"
        )
    _check_payload(fs, root, legacy, max_payload_bytes, where)
    signed = sign_manifest(legacy, publisher)
    _remove_stale_temporaries(fs, manifest_path)
    _atomic_write(fs, manifest_path, signed.to_json())
    logger.info(
        "re-signed artifact %s (%s key %s -> publisher %s)",
        artifact_id,
        "HMAC" if isinstance(old_keys, Keyring) else "publisher",
        legacy.key_id,
        publisher.key_id,
    )
    return verify_manifest(signed.to_json(), own, expected_id=artifact_id)


def _check_payload(
    fs: Any, root: str, manifest: Manifest, max_payload_bytes: int, where: str
) -> None:
    """The payload beside ``manifest`` must be the one it describes (its size, then its
    SHA-256, read bounded and hashed as it streams), or ``ArtifactIntegrityError``
    (``FileNotFoundError`` where there is none in the store ``where`` names)."""
    what = f"artifact {manifest.artifact_id!r}"
    if manifest.size > max_payload_bytes:
        raise ArtifactIntegrityError(
            f"{what}: manifest declares {manifest.size} bytes, above {max_payload_bytes}"
        )
    hasher = hashlib.sha256()
    try:
        payload = read_bounded(
            fs,
            f"{root}/{manifest.artifact_id}{PAYLOAD_SUFFIX}",
            manifest.size,
            what=f"{what}: payload",
            why="the size its manifest declares",
            chunk_bytes=READ_CHUNK_BYTES,
            hasher=hasher,
        )
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} has a manifest but no payload in {where}") from None
    verify_payload_digest(len(payload), hasher.hexdigest(), manifest)


def _verify_legacy_manifest(raw: bytes, keyring: Keyring, artifact_id: str) -> Manifest:
    """A version 1 manifest checked the way it was signed: HMAC-SHA256 (no purpose tag) over
    its canonical JSON without the signature, by the keyring key its ``key_id`` names.
    Returned as an unsigned, unverified version 2 ``Manifest`` with the same fields."""
    where = f"artifact {artifact_id!r}"
    try:
        data = strict_json_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactIntegrityError(f"{where}: manifest is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("signature"), str):
        raise ArtifactIntegrityError(f"{where}: not a signed version 1 manifest")
    key_id = data.get("key_id")
    key = keyring.get(key_id) if isinstance(key_id, str) else None
    if key is None:
        raise ArtifactIntegrityError(
            f"{where}: its HMAC key {key_id!r} is not in the legacy keyring; cannot check the "
            "old signature (publish the artifact again instead)"
        )
    unsigned = {k: v for k, v in data.items() if k != "signature"}
    try:
        expected = hmac.new(key, canonical_json(unsigned), hashlib.sha256).hexdigest()
    except ValueError as exc:
        raise ArtifactIntegrityError(f"{where}: manifest cannot be canonicalised ({exc})") from None
    if not hmac.compare_digest(expected.encode(), data["signature"].encode("utf-8")):
        raise ArtifactIntegrityError(f"{where}: old HMAC signature does not verify; not re-signed")
    try:
        manifest = Manifest.from_dict(
            {**unsigned, "signature": "", "manifest_version": MANIFEST_VERSION}
        )
    except ValueError as exc:
        raise ArtifactIntegrityError(f"{where}: malformed manifest ({exc})") from None
    if manifest.artifact_id != artifact_id:
        raise ArtifactIntegrityError(
            f"{where}: manifest is for a different artifact ({manifest.artifact_id!r})"
        )
    return manifest


def _require_publisher(publisher: object) -> None:
    if not isinstance(publisher, PublisherKey):
        raise TypeError(
            "artifacts are signed with an Ed25519 PublisherKey (kasmina keygen --publisher), not "
            f"{type(publisher).__name__}; HMAC keyrings authenticate controller commands only"
        )


def _atomic_write(fs: Any, path: str, data: bytes) -> None:
    """``data`` at ``path``, whole, through a temporary name. Locally ``atomic_write_bytes``
    (fsync'd, then ``os.replace``, which replaces a link at ``path`` itself and refuses a
    directory there: fsspec's local ``mv`` is ``shutil.move``, which moved the file *into* a
    directory at ``path``, or through a link out of the store, and the publish said it had
    written the payload); elsewhere fsspec's write and ``mv``."""
    if isinstance(fs, LocalFileSystem):
        _naming(path, lambda: atomic_write_bytes(path, [data], private=False))
    else:
        _through_temporary(fs, path, data, lambda tmp: fs.mv(tmp, path))


def _remove_stale_temporaries(fs: Any, *paths: str) -> None:
    """On a local filesystem, remove the temporaries a killed write of ``paths`` left beside
    them (``remove_stale_temporaries_of``: those old enough to be no live writer's)."""
    if isinstance(fs, LocalFileSystem):
        for path in paths:
            remove_stale_temporaries_of(Path(path))


def _naming(path: str, write: Callable[[], _T]) -> _T:
    """``write()``, its ``OSError`` naming ``path``, the file the caller meant to write, never
    the temporary it went through."""
    try:
        return write()
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, path) from None


def _through_temporary(fs: Any, path: str, data: bytes, commit: Callable[[str], _T]) -> _T:
    """On a store that is no local filesystem: write ``data`` to a temporary name beside
    ``path`` and return ``commit(temporary)`` (which moves it into place). The temporary
    never outlives the call, whatever fails (fsspec backends raise errors of their own types;
    a Ctrl-C lands anywhere), and an ``OSError`` names ``path`` (``_naming``)."""
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"

    def write() -> _T:
        fs.pipe_file(tmp, data)
        return commit(tmp)

    try:
        return _naming(path, write)
    finally:
        with contextlib.suppress(Exception):  # best effort: a leftover is only storage
            if fs.exists(tmp):
                fs.rm(tmp)
