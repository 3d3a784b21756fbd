"""Publishing artifacts to an Urza store (the write side of ``kasmina.urza.client``).

``publish_artifact`` exports a module with ``torch.export``, saves it as ``.pt2`` and writes it
with a manifest signed by the publisher's key; ``publish_payload`` does the same for bytes that
are already a saved program. The payload is written before the manifest, each through a
temporary name and a rename, so readers only ever list complete artifacts.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from kasmina.errors import ArtifactIntegrityError
from kasmina.urza.artifact import (
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    PAYLOAD_SUFFIX,
    Manifest,
    TensorSpec,
    open_store,
    payload_sha256,
    read_bounded,
    sign_manifest,
    validate_artifact_id,
    verify_manifest,
)
from kasmina.utils.keyring import Keyring

logger = logging.getLogger(__name__)

__all__ = ["default_artifact_id", "export_module", "publish_artifact", "publish_payload"]


def export_module(
    module: nn.Module, example_inputs: Sequence[torch.Tensor], *, dynamic: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export`` a module. With ``dynamic`` every dimension is ``Dim.AUTO``: dimensions
    the module does not pin (batch, sequence) stay dynamic; sizes 0 and 1 specialise, so give
    example inputs with at least 2 along each dimension meant to vary."""
    inputs = tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a non-empty sequence of tensors")
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
    keyring: Keyring,
    key_id: str,
    artifact_id: str | None = None,
    *,
    dynamic: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Export ``module`` (in its current train/eval mode: dropout and batch norm keep the
    behaviour they had at export), save it as ``.pt2`` and publish it signed by ``key_id``."""
    program = export_module(module, example_inputs, dynamic=dynamic)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return publish_payload(
        buffer.getvalue(),
        store_url,
        blueprint,
        keyring,
        key_id,
        artifact_id,
        input_spec=_input_spec(program),
        storage_options=storage_options,
    )


def publish_payload(
    payload: bytes,
    store_url: str,
    blueprint: str,
    keyring: Keyring,
    key_id: str,
    artifact_id: str | None = None,
    *,
    input_spec: Sequence[TensorSpec] = (),
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Write already-saved ``.pt2`` bytes and their signed manifest (payload first).

    Publishing is idempotent for identical bytes; an existing id with a different payload
    raises ``FileExistsError`` (a published artifact never changes under its id).
    """
    if not isinstance(blueprint, str) or not blueprint:
        raise ValueError("blueprint must be a non-empty string")
    sha256 = payload_sha256(payload)
    artifact_id = validate_artifact_id(artifact_id or default_artifact_id(blueprint, sha256))
    manifest = sign_manifest(
        Manifest(
            artifact_id=artifact_id,
            blueprint=blueprint,
            sha256=sha256,
            size=len(payload),
            input_spec=tuple(input_spec),
            key_id=key_id,
            created=time.time(),
            torch_version=torch.__version__,
        ),
        keyring,
        key_id,
    )
    fs, root = open_store(store_url, storage_options)
    manifest_path = f"{root}/{artifact_id}{MANIFEST_SUFFIX}"
    if fs.exists(manifest_path):
        try:
            raw = read_bounded(
                fs,
                manifest_path,
                MAX_MANIFEST_BYTES,
                what=f"artifact {artifact_id!r}: existing manifest",
                why="MAX_MANIFEST_BYTES",
            )
            existing = verify_manifest(raw, keyring, expected_id=artifact_id)
        except ArtifactIntegrityError:
            existing = None
        if existing is not None and existing.sha256 == sha256:
            logger.info("artifact %s already published with identical payload", artifact_id)
            return existing
        raise FileExistsError(f"artifact {artifact_id!r} already exists with a different payload")
    fs.makedirs(root, exist_ok=True)
    _atomic_write(fs, f"{root}/{artifact_id}{PAYLOAD_SUFFIX}", bytes(payload))
    _atomic_write(fs, manifest_path, manifest.to_json())
    logger.info("published artifact %s (%d bytes) to %s", artifact_id, len(payload), store_url)
    return verify_manifest(manifest.to_json(), keyring, expected_id=artifact_id)


def _atomic_write(fs: Any, path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)
