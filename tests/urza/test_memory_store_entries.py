"""A ``memory://`` store with a directory where a manifest or a payload should be: that
artifact's problem, answered by the store (``ArtifactIntegrityError`` "not a readable file"),
read once and never retried, and no failure of the store (the breaker stays closed); the
store's sound artifacts are served as before."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
import torch

from kasmina.errors import ArtifactIntegrityError
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.keys import PublisherKey
from kasmina.urza.publish import publish_artifact

PUBLISHER = PublisherKey.generate("pub")


@pytest.fixture
def memory_store() -> Iterator[tuple[str, str, str, Any]]:
    """``(url, root, the artifact id, fs)``: one real artifact in a fresh memory store."""
    root = f"/urza-{uuid.uuid4().hex}"
    url = f"memory://{root.lstrip('/')}"
    torch.manual_seed(1)
    artifact = publish_artifact(ResidualMLP(2, 4), [torch.randn(3, 2)], url, "mlp", PUBLISHER)
    fs = fsspec.filesystem("memory")
    yield url, root, artifact.artifact_id, fs
    fs.rm(root, recursive=True)


def _client(url: str, fs: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[UrzaLibraryClient, dict]:
    """A client that would retry twice and open its breaker at one failure; counts the reads
    of each path (the memory store's reads are ``cat_file`` calls)."""
    urza = UrzaLibraryClient(
        url, PUBLISHER.trusted_publishers(), retries=2, backoff_s=0.0, breaker_threshold=1
    )
    assert urza._fs is fs
    reads: dict[str, int] = {}
    real = fs.cat_file

    def cat_file(path: str, *args: Any, **kwargs: Any) -> bytes:
        reads[path] = reads.get(path, 0) + 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fs, "cat_file", cat_file)
    return urza, reads


def _directory_at(fs: Any, path: str) -> None:
    fs.makedirs(f"{path}/inner", exist_ok=True)
    fs.pipe_file(f"{path}/inner/x", b"1")


def test_a_directory_at_a_manifest_is_refused_once(memory_store, monkeypatch) -> None:
    """Listed (its name is a manifest's), refused by ``get_manifest`` and ``fetch`` alike."""
    url, root, artifact_id, fs = memory_store
    _directory_at(fs, f"{root}/bogus.manifest.json")
    urza, reads = _client(url, fs, monkeypatch)
    assert urza.list_artifacts() == sorted(["bogus", artifact_id])
    for read in (urza.get_manifest, urza.fetch):
        with pytest.raises(
            ArtifactIntegrityError, match="'bogus': manifest is not a readable file"
        ):
            read("bogus")
    assert reads == {f"{root}/bogus.manifest.json": 2}  # once per call: never retried
    assert urza.stats()["read_failures"] == 0 and urza.breaker.state == "closed"
    payload, manifest = urza.fetch(artifact_id)  # the sound artifact is served as before
    assert manifest.artifact_id == artifact_id and len(payload) == manifest.size > 0


def test_a_directory_at_a_payload_is_refused_once(memory_store, monkeypatch) -> None:
    """The manifest verifies; the payload's path is a directory: refused without a retry,
    and the breaker stays closed."""
    url, root, artifact_id, fs = memory_store
    (payload_path,) = [
        p for p in fs.ls(root, detail=False) if artifact_id in p and not p.endswith(".json")
    ]
    fs.rm(payload_path)
    _directory_at(fs, payload_path)
    urza, reads = _client(url, fs, monkeypatch)
    assert urza.get_manifest(artifact_id).artifact_id == artifact_id
    with pytest.raises(
        ArtifactIntegrityError, match=f"'{artifact_id}': payload is not a readable file"
    ):
        urza.fetch(artifact_id)
    assert reads[payload_path] == 1
    assert urza.stats()["read_failures"] == 0 and urza.breaker.state == "closed"
    assert urza.verify_store()[artifact_id].startswith(
        f"ArtifactIntegrityError: artifact '{artifact_id}': payload is not a readable file"
    )
