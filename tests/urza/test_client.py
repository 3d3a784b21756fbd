"""Urza store: publish, fetch, verification before deserialisation, resilience, coalescing."""

from __future__ import annotations

import asyncio
import base64
import functools
import http.server
import io
import json
import logging
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from kasmina.errors import ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError
from kasmina.urza.artifact import Manifest, chain_layers, sign_manifest, verify_manifest
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_artifact, publish_payload
from kasmina.urza.resilience import CircuitBreaker
from tests.urza.helpers import FakeClock, FlakyFS, arm_pt2, serve, serve_directory


@pytest.fixture(scope="module")
def other() -> PublisherKey:
    return PublisherKey.generate("other")


@pytest.fixture(scope="module")
def trusted(publisher: PublisherKey, other: PublisherKey) -> TrustedPublishers:
    """What a trainer holds: the two publishers' public keys, nothing that signs."""
    return TrustedPublishers({k.key_id: k.public_key for k in (publisher, other)})


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, publisher: PublisherKey):
    """One real exported artifact in a local store (export once per module: it is slow)."""
    store = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    manifest = publish_artifact(module, (torch.randn(4, 8),), str(store), "mlp", publisher)
    return store, manifest, module


@pytest.fixture
def store(tmp_path: Path, published) -> tuple[Path, Manifest]:
    """A private copy of the published store that a test may tamper with."""
    src, manifest, _ = published
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst, manifest


def client(url: str, trusted: TrustedPublishers, **kwargs) -> UrzaLibraryClient:
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("backoff_s", 0.0)
    return UrzaLibraryClient(url, trusted, **kwargs)


def manifest_path(store: Path, artifact_id: str) -> Path:
    return store / f"{artifact_id}.manifest.json"


def payload_path(store: Path, artifact_id: str) -> Path:
    return store / f"{artifact_id}.pt2"


def test_publish_list_fetch_roundtrip(store, trusted) -> None:
    root, manifest = store
    urza = client(str(root), trusted)
    assert urza.list_artifacts() == [manifest.artifact_id]
    payload, fetched = urza.fetch(manifest.artifact_id)
    assert fetched == manifest and fetched.verified
    assert payload == payload_path(root, manifest.artifact_id).read_bytes()
    assert fetched.input_spec[0].shape == (None, 8) and fetched.input_spec[0].dtype == "float32"
    assert urza.verify(manifest.artifact_id) == manifest
    assert urza.stats()["fetches"] == 2
    with urza:
        assert urza.fetch(manifest.artifact_id)[1] == manifest
    with pytest.raises(RuntimeError, match="closed"):
        urza.fetch(manifest.artifact_id)


def test_a_store_may_be_a_path_and_nothing_else_but_a_string(store, trusted) -> None:
    """A ``Path`` reached ``url.startswith`` (AttributeError), a number a regex (TypeError)."""
    root, manifest = store
    with client(root, trusted) as urza:  # type: ignore[arg-type]
        assert urza.list_artifacts() == [manifest.artifact_id]
    with pytest.raises(TypeError, match="url must be a store's path or URL"):
        client(5, trusted)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("timeout_s", float("inf")),  # every read failed: "timestamp out of range"
        ("timeout_s", float("nan")),
        ("retries", 2.7),  # was int(2.7) == 2
        ("retries", True),
        ("backoff_s", float("nan")),
        ("backoff_max_s", 1e10),  # its wait raised OverflowError ("timestamp out of range")
        ("breaker_threshold", float("nan")),  # the breaker never opened
        ("breaker_threshold", 0),
        ("breaker_reset_s", float("nan")),  # an open breaker never half-opened
        ("breaker_reset_s", -1.0),
    ],
)
def test_client_settings_are_held_to_the_configs_ranges(store, trusted, setting, value) -> None:
    with pytest.raises(ValueError, match=f"^{setting} must be"):
        UrzaLibraryClient(str(store[0]), trusted, **{setting: value})
    if setting.startswith("breaker_"):  # the breaker itself, built alone
        arguments = {"threshold": 1, "reset_s": 1.0, setting.removeprefix("breaker_"): value}
        with pytest.raises(ValueError, match=f"^{setting} must be"):
            CircuitBreaker(**arguments)


def test_publish_is_idempotent_and_never_overwrites(tmp_path, publisher, trusted) -> None:
    first = publish_payload(b"payload-one", str(tmp_path), "blue", publisher, "art-1")
    again = publish_payload(b"payload-one", str(tmp_path), "blue", publisher, "art-1")
    assert again == first
    with pytest.raises(FileExistsError):
        publish_payload(b"payload-two", str(tmp_path), "blue", publisher, "art-1")
    assert client(str(tmp_path), trusted).fetch("art-1")[0] == b"payload-one"
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.parametrize("name", ["a::b", "x/a::b"])
def test_a_local_store_whose_name_holds_a_double_colon_is_that_directory(
    tmp_path, publisher, trusted, monkeypatch, name
) -> None:
    """``::`` chains filesystems in fsspec: ``a::b`` was written to a sibling ``a:`` and
    ``x/a::b`` to ``x/a``, while the publish said it wrote to the directory named."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir(parents=True)
    publish_payload(b"payload-one", name, "blue", publisher, "art-1")
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == [
        "art-1.manifest.json",
        "art-1.pt2",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name.split("/")[0]]
    assert client(name, trusted).fetch("art-1")[0] == b"payload-one"


def test_a_local_file_url_whose_name_holds_a_double_colon_is_that_directory(
    tmp_path, publisher, trusted, monkeypatch
) -> None:
    """No layer follows a local file, yet fsspec chained ``file:///x/a::b`` at the ``::``:
    the store was written to ``/x/a`` (and a layer ``b:`` looked for in the working
    directory), not the directory named."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "x" / "a::b"
    store.mkdir(parents=True)
    url = f"file://{store}"
    publish_payload(b"payload-one", url, "blue", publisher, "art-1")
    assert sorted(p.name for p in store.iterdir()) == ["art-1.manifest.json", "art-1.pt2"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(
        ["x", "a::b", "art-1.manifest.json", "art-1.pt2"]
    )
    assert client(url, trusted).fetch("art-1")[0] == b"payload-one"


@pytest.mark.parametrize("scheme", ["file", "local"])
def test_a_file_url_naming_localhost_is_that_local_path(
    tmp_path, publisher, trusted, monkeypatch, scheme
) -> None:
    """``file://localhost/p`` is ``/p`` (RFC 8089); fsspec read it as ``localhost/p`` under the
    working directory: a publisher and a trainer in different directories, or one given
    ``/p`` and the other the URL, did not see the same store."""
    store, elsewhere = tmp_path / "store", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    url = f"{scheme}://LocalHost{store}"
    publish_payload(b"payload-one", url, "blue", publisher, "art-1")
    assert sorted(p.name for p in store.iterdir()) == ["art-1.manifest.json", "art-1.pt2"]
    assert not list(elsewhere.iterdir())
    assert client(url, trusted).fetch("art-1")[0] == b"payload-one"
    assert client(str(store), trusted).list_artifacts() == ["art-1"]
    # As a chain's layer too (the client refuses a caching layer; a publish goes through it).
    publish_payload(b"payload-two", f"simplecache::{url}", "blue", publisher, "art-2")
    assert client(url, trusted).fetch("art-2")[0] == b"payload-two"
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize(
    "url", ["http://[::1]:8080/store", "http://[fe80::1]/store", "https://[2001:db8::ff00:42]/s"]
)
def test_an_ipv6_store_url_is_taken_as_one_url(url, trusted) -> None:
    """A store URL's layers are split at ``::`` (fsspec chaining), which also cut an IPv6
    host's brackets apart: every IPv6 store was refused as malformed. Split outside them; a
    layer in front is still found, a ``]`` after it too, and a ``::`` after the brackets."""
    UrzaLibraryClient(url, trusted, timeout_s=1.0, retries=0).close()
    for chained in (f"simplecache::{url}", "simplecache::/tmp/store]"):
        with pytest.raises(ValueError, match="caching layer"):
            UrzaLibraryClient(chained, trusted)
    assert chain_layers(f"{url}::x::y") == [url, "x", "y"]


@pytest.mark.parametrize("url", ["http:///store", "http://:80/store", "https://al:pw@/store"])
def test_an_http_store_url_naming_no_host_is_refused_when_the_client_is_built(trusted, url) -> None:
    """The client was built and every read failed ("host is required"), retried as a
    transport error and counted against the store, when the URL itself was wrong."""
    with pytest.raises(ValueError, match="names no host") as info:
        UrzaLibraryClient(url, trusted, timeout_s=1.0, retries=0)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize("url", ["/tmp/st\0ore", "file:///tmp/st\0ore", "http://h/s\0"])
def test_a_store_url_holding_a_nul_is_refused_when_the_client_is_built(trusted, url) -> None:
    """No URL holds one raw, and no local path can: the client of a local store was built
    and every read failed ("embedded null byte"), retried as a transport error and counted
    against the store."""
    with pytest.raises(ValueError, match="holds a NUL character"):
        UrzaLibraryClient(url, trusted, timeout_s=1.0, retries=0)


@pytest.mark.parametrize("mark", ["/", "#", "?"])
def test_a_password_with_a_raw_slash_hash_or_question_mark_is_refused_unseen(trusted, mark) -> None:
    """Such a character ends the authority, so the password's head became a port: the client
    was built, every read failed as a transport error ("port can't be converted to integer"),
    retried and counted against the store, and each message showed the password whole."""
    secret = f"s3cr{mark}et-Tail"
    url = f"https://alice:{secret}@127.0.0.1:9/urza"
    with pytest.raises(ValueError, match="port is not a number") as info:
        UrzaLibraryClient(url, trusted, timeout_s=1.0, retries=0)
    assert "s3cr" not in str(info.value) and "et-Tail" not in str(info.value)
    assert "'https://***@127.0.0.1:9/urza'" in str(info.value) and "%2F" in str(info.value)
    with pytest.raises(ValueError, match="port is not a number"):
        UrzaLibraryClient("http://127.0.0.1:99999/urza", trusted)
    encoded = url.replace(mark, {"/": "%2F", "#": "%23", "?": "%3F"}[mark])
    UrzaLibraryClient(encoded, trusted, timeout_s=1.0, retries=0).close()


def test_an_ipv6_http_store_is_read(store, trusted) -> None:
    """fsspec's own URL parsing splits at every ``::``: an IPv6 store's root became ``http://[``
    and every read failed ("Invalid IPv6 URL"), retried and counted against the store."""
    import socket

    root, manifest = store

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            return None

    try:
        server = Server(("::1", 0), functools.partial(Quiet, directory=str(root)))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        urza = client(f"http://[::1]:{server.server_address[1]}/", trusted, timeout_s=5.0)
        assert urza.list_artifacts() == [manifest.artifact_id]
        assert urza.fetch(manifest.artifact_id)[1] == manifest
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_store_write_that_fails_leaves_no_temporary(
    tmp_path, publisher, monkeypatch, where
) -> None:
    """An fsspec backend raises errors of its own types; the temporary used to stay beside
    its target when the write raised anything but an OSError. The manifest the publish wrote
    goes too: the id is free again, not held by a manifest with no payload. A local store's
    payload write failing (its rename, here) likewise."""
    import os

    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    if where == "local":
        url, real_replace = str(tmp_path), os.replace

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith(".pt2"):  # written, then the rename fails
                raise RuntimeError("backend error")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    else:
        url, real_pipe = f"memory://urza-{uuid.uuid4().hex}", MemoryFileSystem.pipe_file

        def pipe_file(self, path, data, **kwargs):
            real_pipe(self, path, data, **kwargs)
            if ".pt2" in path:  # written, then the backend fails
                raise RuntimeError("backend error")

        monkeypatch.setattr(MemoryFileSystem, "pipe_file", pipe_file)
    with pytest.raises(RuntimeError, match="backend error"):
        publish_payload(b"payload", url, "blue", publisher, "art-1")
    fs, root = fsspec.core.url_to_fs(url)
    assert fs.ls(root, detail=False) == []


class _PausingFS:
    """A store whose payload writes from the thread named ``slow`` wait for ``go``."""

    def __init__(self, fs, go: threading.Event, paused: threading.Event) -> None:
        self.fs, self.go, self.paused = fs, go, paused

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def pipe_file(self, path, data, **kwargs):
        if threading.current_thread().name == "slow" and ".pt2" in path:
            self.paused.set()
            assert self.go.wait(10)
        return self.fs.pipe_file(path, data, **kwargs)


def test_two_publishers_of_one_id_at_once_leave_one_artifact(
    tmp_path, publisher, trusted, monkeypatch
) -> None:
    """The manifest is claimed exclusively before the payload is written: while the first
    publisher is between its writes, a second one with other bytes is refused, a reader finds
    the artifact missing (not corrupt), and the store ends with the first one's artifact."""
    import kasmina.urza.publish as publish

    go, paused = threading.Event(), threading.Event()
    real = publish.open_store
    monkeypatch.setattr(
        publish,
        "open_store",
        lambda *a: (lambda fr: (_PausingFS(fr[0], go, paused), fr[1]))(real(*a)),
    )
    done: list = []
    slow = threading.Thread(
        target=lambda: done.append(
            publish_payload(b"A" * 64, str(tmp_path), "bp", publisher, "id")
        ),
        name="slow",
    )
    slow.start()
    assert paused.wait(10)
    with pytest.raises(FileExistsError, match="different payload"):
        publish_payload(b"B" * 64, str(tmp_path), "bp", publisher, "id")
    with pytest.raises(ArtifactNotFoundError):
        client(str(tmp_path), trusted).fetch("id")
    # The claim appears whole: a reader in the window reads a complete, signed manifest.
    assert verify_manifest(manifest_path(tmp_path, "id").read_bytes(), trusted).artifact_id == "id"
    go.set()
    slow.join(10)
    assert done and client(str(tmp_path), trusted).fetch("id")[0] == b"A" * 64
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_publish_stopped_between_its_writes_or_damaged_is_finished_by_publishing_again(
    tmp_path, publisher, trusted
) -> None:
    first = publish_payload(b"payload", str(tmp_path), "bp", publisher, "art")
    payload_path(tmp_path, "art").unlink()  # the manifest landed, the payload did not
    with pytest.raises(FileExistsError):
        publish_payload(b"other", str(tmp_path), "bp", publisher, "art")
    again = publish_payload(b"payload", str(tmp_path), "bp", publisher, "art")
    assert again == first
    assert client(str(tmp_path), trusted).fetch("art")[0] == b"payload"
    payload_path(tmp_path, "art").write_bytes(b"pay1oad")  # damaged, the same size
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        client(str(tmp_path), trusted).fetch("art")
    assert publish_payload(b"payload", str(tmp_path), "bp", publisher, "art") == first
    assert client(str(tmp_path), trusted).fetch("art")[0] == b"payload"  # repaired


def test_default_id_is_sanitised_blueprint_and_hash(tmp_path, publisher) -> None:
    manifest = publish_payload(b"x" * 10, str(tmp_path), "../my blueprint", publisher)
    assert manifest.artifact_id.startswith("my-blueprint-")
    assert manifest.artifact_id[-16:] == manifest.sha256[:16]


def test_an_empty_artifact_id_is_refused_not_replaced_by_the_default(tmp_path, publisher) -> None:
    """``artifact_id=""`` (an unset variable) published under the generated id, unseen, as
    the CLI's ``--artifact-id ""`` is refused for."""
    with pytest.raises(ValueError, match="invalid artifact id ''"):
        publish_payload(b"x" * 10, str(tmp_path), "bp", publisher, "")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", [0, 0.5, -1])
def test_one_flipped_payload_bit_is_rejected(store, trusted, where) -> None:
    root, manifest = store
    path = payload_path(root, manifest.artifact_id)
    data = bytearray(path.read_bytes())
    index = int(where * (len(data) - 1)) if where != -1 else len(data) - 1
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        client(str(root), trusted).fetch(manifest.artifact_id)


def test_truncated_or_extended_payload_is_rejected(store, trusted) -> None:
    root, manifest = store
    path = payload_path(root, manifest.artifact_id)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ArtifactIntegrityError, match="bytes"):
        client(str(root), trusted).fetch(manifest.artifact_id)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("blueprint", "other-blueprint"),
        ("size", 1),
        ("sha256", "0" * 64),
        ("created", 0.0),
        ("torch_version", "1.0"),
        ("input_spec", [{"shape": [None, 9], "dtype": "float32"}]),
        ("key_id", "other"),
    ],
)
def test_changed_manifest_field_is_rejected(store, trusted, field, value) -> None:
    root, manifest = store
    path = manifest_path(root, manifest.artifact_id)
    data = json.loads(path.read_bytes())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactIntegrityError, match="signature"):
        client(str(root), trusted).fetch(manifest.artifact_id)


def test_wrong_signatures_are_rejected(store, trusted) -> None:
    root, manifest = store
    path = manifest_path(root, manifest.artifact_id)
    original = json.loads(path.read_bytes())
    urza = client(str(root), trusted)
    # Signed with another key but claiming to be "pub".
    impostor = PublisherKey.generate("pub")
    forged = sign_manifest(manifest, impostor)
    path.write_bytes(forged.to_json())
    with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
        urza.fetch(manifest.artifact_id)
    # Garbage, truncated, extended, non-base64 and non-ASCII signatures.
    good = base64.b64decode(original["signature"])
    for bad in (
        base64.b64encode(bytes(64)).decode(),
        base64.b64encode(good[:63]).decode(),
        base64.b64encode(good + b"\0").decode(),
        "zz",
        "é" * 88,
    ):
        path.write_text(json.dumps({**original, "signature": bad}))
        with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
            urza.fetch(manifest.artifact_id)
    # A key the client does not know.
    rogue = PublisherKey.generate("rogue")
    path.write_bytes(sign_manifest(manifest, rogue).to_json())
    with pytest.raises(ArtifactIntegrityError, match="unknown publisher key 'rogue'"):
        urza.fetch(manifest.artifact_id)


def test_only_the_configured_publishers_are_trusted(store, publisher, other) -> None:
    root, manifest = store
    manifest_path(root, manifest.artifact_id).write_bytes(sign_manifest(manifest, other).to_json())
    both = TrustedPublishers({"pub": publisher.public_key, "other": other.public_key})
    assert client(str(root), both).fetch(manifest.artifact_id)[1].key_id == "other"
    strict = client(str(root), publisher.trusted_publishers())
    with pytest.raises(ArtifactIntegrityError, match="unknown publisher key 'other'"):
        strict.fetch(manifest.artifact_id)
    nobody = client(str(root), TrustedPublishers())
    with pytest.raises(ArtifactIntegrityError, match="none configured"):
        nobody.fetch(manifest.artifact_id)


@pytest.mark.parametrize("signature", [None, ""])
def test_missing_signature_is_rejected(store, trusted, signature) -> None:
    root, manifest = store
    path = manifest_path(root, manifest.artifact_id)
    data = json.loads(path.read_bytes())
    if signature is None:
        del data["signature"]
    else:
        data["signature"] = signature
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactIntegrityError, match="unsigned"):
        client(str(root), trusted).fetch(manifest.artifact_id)


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1, 2]",
        b'{"signature": "a", "signature": "b"}',
        b"\xff\xfe",
        b"{}",
        b"[" * 100_000 + b"]" * 100_000,  # 200 KB, deeper than the parser can recurse
    ],
    ids=["text", "list", "duplicate", "utf16", "empty", "deep"],
)
def test_malformed_manifests_are_rejected(trusted, raw) -> None:
    with pytest.raises(ArtifactIntegrityError):
        verify_manifest(raw, trusted)


def test_signed_manifest_with_bad_fields_is_rejected(publisher, trusted) -> None:
    """Even a correctly signed manifest must be well formed."""
    good = Manifest("a1", "bp", "0" * 64, 3, (), "pub", 1.0, "2")
    signed = json.loads(sign_manifest(good, publisher).to_json())
    private = publisher._private  # the raw key, to sign independently of the code under test

    def resign(data: dict) -> bytes:
        data = {k: v for k, v in data.items() if k != "signature"}
        # An independent signer: Ed25519 over the purpose tag and the canonical JSON.
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("ascii")
        signature = private.sign(b"kasmina-urza-manifest-v2\0" + canonical)
        data["signature"] = base64.b64encode(signature).decode()
        return json.dumps(data).encode()

    assert verify_manifest(resign(signed), trusted).unsigned_dict() == good.unsigned_dict()
    bad_fields = [("format", "pickle"), ("size", -1), ("extra", 1), ("sha256", "X" * 64)]
    for field, value in bad_fields:
        with pytest.raises(ArtifactIntegrityError, match="malformed"):
            verify_manifest(resign({**signed, field: value}), trusted)
    for version in (3, "2", True, None):
        with pytest.raises(ArtifactIntegrityError, match="unsupported manifest version"):
            verify_manifest(resign({**signed, "manifest_version": version}), trusted)


def test_manifest_for_another_id_is_rejected(store, trusted) -> None:
    root, manifest = store
    shutil.copy(manifest_path(root, manifest.artifact_id), manifest_path(root, "alias"))
    shutil.copy(payload_path(root, manifest.artifact_id), payload_path(root, "alias"))
    with pytest.raises(ArtifactIntegrityError, match="different artifact"):
        client(str(root), trusted).fetch("alias")


def test_missing_artifacts_and_bad_ids(store, trusted) -> None:
    root, manifest = store
    urza = client(str(root), trusted)
    with pytest.raises(ArtifactNotFoundError):
        urza.fetch("no-such-artifact")
    payload_path(root, manifest.artifact_id).unlink()
    with pytest.raises(ArtifactNotFoundError, match="no payload"):
        urza.fetch(manifest.artifact_id)
    for bad in ("../etc/passwd", "", "a/b", ".hidden", "x" * 200):
        with pytest.raises(ValueError, match="invalid artifact id"):
            urza.fetch(bad)
    with pytest.raises(ValueError, match=r"\.\.\. \(200 characters\)"):  # the id's, not its repr's
        urza.fetch("x" * 200)
    assert urza.breaker.state == "closed"
    assert client(str(root / "does-not-exist"), trusted).list_artifacts() == []


def test_nothing_is_deserialised_before_verification(store, trusted, tmp_path) -> None:
    root, manifest = store
    clean = payload_path(root, manifest.artifact_id).read_bytes()
    # The trap is armed: loading the crafted payload really does run its pickle.
    control = tmp_path / "control-marker"
    with pytest.raises(Exception):  # noqa: B017 - the loader rejects the weight after unpickling
        torch.export.load(io.BytesIO(arm_pt2(clean, control)))
    assert control.exists()

    marker = tmp_path / "marker"
    evil = arm_pt2(clean, marker)
    urza = client(str(root), trusted)
    # 1. Payload swapped under a valid manifest: the hash no longer matches.
    payload_path(root, manifest.artifact_id).write_bytes(evil)
    with pytest.raises(ArtifactIntegrityError):
        payload, fetched = urza.fetch(manifest.artifact_id)
    with pytest.raises(ArtifactIntegrityError):
        GPUKernel.from_binary(evil, urza.get_manifest(manifest.artifact_id))
    # 2. Published under a matching manifest, but signed by a key the client does not hold.
    rogue = PublisherKey.generate("pub")
    publish_payload(evil, str(root), "mlp", rogue, "evil")
    with pytest.raises(ArtifactIntegrityError, match="signature"):
        urza.fetch("evil")
    # 3. Published with no signature at all.
    data = json.loads(manifest_path(root, "evil").read_bytes())
    del data["signature"]
    manifest_path(root, "evil").write_text(json.dumps(data))
    with pytest.raises(ArtifactIntegrityError, match="unsigned"):
        urza.fetch("evil")
    assert not marker.exists()


def test_memory_store(publisher, trusted, published) -> None:
    _, manifest, _ = published
    url = f"memory://urza-{uuid.uuid4().hex}"
    payload = payload_path(published[0], manifest.artifact_id).read_bytes()
    published_here = publish_payload(
        payload, url, "mlp", publisher, manifest.artifact_id, input_spec=manifest.input_spec
    )
    urza = client(url, trusted)
    assert urza.list_artifacts() == [manifest.artifact_id]
    got, got_manifest = urza.fetch(manifest.artifact_id)
    assert got == payload and got_manifest == published_here
    kernel = GPUKernel.from_binary(got, got_manifest)
    x = torch.randn(3, 8)
    torch.testing.assert_close(kernel(x), published[2](x))


def test_http_store_on_loopback(store, trusted) -> None:
    root, manifest = store
    with serve_directory(root) as url:
        urza = client(url, trusted, timeout_s=5.0)
        assert urza.list_artifacts() == [manifest.artifact_id]
        payload, fetched = urza.fetch(manifest.artifact_id)
        assert payload == payload_path(root, manifest.artifact_id).read_bytes()
        assert fetched == manifest
        with pytest.raises(ArtifactNotFoundError):
            urza.fetch("absent")
        path = payload_path(root, manifest.artifact_id)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x80
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactIntegrityError):
            urza.fetch(manifest.artifact_id)
    # The server is gone: connection refused, retried, then unavailable.
    gone = client(url, trusted, retries=1, sleep=lambda s: None)
    with pytest.raises(UrzaUnavailableError, match="after 2 attempts"):
        gone.fetch(manifest.artifact_id)


def test_a_signed_http_store_url_keeps_its_query_after_each_objects_name(store, trusted) -> None:
    """A store URL with a signed URL's query (``?sig=...``) made every object URL
    ``<url>?<query>/<id>.manifest.json``: the server saw the store's path with the name inside
    the signature, every read failed and counted against the store."""
    root, manifest = store
    asked: list[str] = []

    class Signed(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            return None

        def do_GET(self) -> None:
            asked.append(self.path)
            path, _, query = self.path.partition("?")
            if query != "sig=abc&sv=1":
                self.send_error(403)
                return
            self.path = path
            super().do_GET()

    with serve(functools.partial(Signed, directory=str(root))) as url:
        urza = client(f"{url}/?sig=abc&sv=1", trusted, timeout_s=5.0)
        assert urza.list_artifacts() == [manifest.artifact_id]
        assert urza.fetch(manifest.artifact_id)[1] == manifest
    assert all(path.endswith("?sig=abc&sv=1") for path in asked)
    assert f"/{manifest.artifact_id}.manifest.json?sig=abc&sv=1" in asked


def test_client_options_of_its_own_keep_the_reads_deadline(trusted) -> None:
    """Any ``client_kwargs`` (a header, ``trust_env``) dropped the client's read timeout for
    aiohttp's 300 s: an abandoned read held its thread and stall slot for minutes."""
    options = {"client_kwargs": {"headers": {"X-Api-Key": "k"}, "trust_env": True}}
    urza = UrzaLibraryClient(
        "http://127.0.0.1:9/u", trusted, timeout_s=1.5, storage_options=options
    )
    given = urza._fs.client_kwargs
    assert given["timeout"].total == 1.5 and given["headers"] == {"X-Api-Key": "k"}
    assert "timeout" not in options["client_kwargs"]  # the caller's dict is left alone
    urza.close()


def test_a_store_urls_credentials_never_reach_a_message_or_a_repr(
    trusted, caplog: pytest.LogCaptureFixture
) -> None:
    """A store URL may carry a user and password, or a signed URL's token in its query: the
    client's errors (which the loader logs and the command log keeps) and a config's repr
    show the URL with both replaced by ``***``."""
    from kasmina.manager.config import KasminaConfig
    from kasmina.urza.redaction import redact_urls

    with serve_directory(Path(".")) as url:  # a port that is free again once the server ends
        pass
    secret_url = url.replace("http://", "http://alice:S3CRET@") + "/urza?sig=S3CRET-SIG"
    gone = client(secret_url, trusted, timeout_s=2.0)
    with caplog.at_level(logging.DEBUG), pytest.raises(UrzaUnavailableError) as raised:
        gone.fetch("mlp")
    assert "S3CRET" not in str(raised.value) and "http://***@127.0.0.1" in str(raised.value)
    assert "S3CRET" not in caplog.text
    config = KasminaConfig(urza_url=secret_url, urza_trusted_publishers={})
    assert "S3CRET" not in repr(config) and "urza_url=" in repr(config)
    assert redact_urls("s3://k:s@b/p?X-Amz-Signature=ab cd") == "s3://***@b/p?*** cd"
    assert redact_urls("/data/urza") == "/data/urza"


@pytest.fixture
def failing_http_store() -> Iterator[str]:
    """A loopback HTTP store having a bad moment: every GET answers 503."""

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    with serve(Unavailable) as url:
        yield url.removeprefix("http://")


@pytest.mark.parametrize("password", ["S3CRET", "S3CRET'sPW", "S3C@RET"])
def test_an_http_errors_request_headers_never_show_the_stores_credentials(
    failing_http_store: str, trusted, caplog: pytest.LogCaptureFixture, password: str
) -> None:
    """An HTTP error's ``repr`` holds its request's headers: the Basic authorization the HTTP
    client made of the URL's ``user:password@``, and a bearer token given in
    ``storage_options``. The client's error and its logs quoted that ``repr``; they show the
    error's text now, with every credential the store's settings hold replaced by ``***``. A
    password with a quote or an ``@`` (legal in a URL's user information) is redacted whole."""
    from kasmina.urza.redaction import redact_urls

    url = f"http://alice:{password}@{failing_http_store}/urza"
    headers = {"headers": {"Authorization": "Bearer T0KEN-0123456789"}}
    basic = base64.b64encode(f"alice:{password}".encode()).decode()
    secrets = (password, basic, "T0KEN-0123456789", password.split("@")[-1])
    for where, options in ((url, None), (f"http://{failing_http_store}/urza", headers)):
        store = client(where, trusted, retries=1, timeout_s=5.0, storage_options=options)
        errors = []
        try:
            for read, args in ((store.fetch, ("mlp",)), (store.list_artifacts, ())):
                with caplog.at_level(logging.DEBUG), pytest.raises(UrzaUnavailableError) as raised:
                    read(*args)
                errors.append(str(raised.value))
        finally:
            store.close()
        assert "503" in errors[0]  # what went wrong is still said
        shown = [*errors, caplog.text, store.url, repr(store)]
        assert not [s for s in secrets for text in shown if s in text]
    redacted = f"see http://***@{failing_http_store}/urza/a.pt2 now"
    assert redact_urls(f"see {url}/a.pt2 now") == redacted


def test_retries_backoff_breaker_and_recovery(store, trusted) -> None:
    root, manifest = store
    clock, sleeps = FakeClock(), []
    urza = client(
        str(root),
        trusted,
        retries=2,
        backoff_s=0.1,
        backoff_max_s=0.15,
        breaker_threshold=3,
        breaker_reset_s=30.0,
        clock=clock,
        sleep=sleeps.append,
    )
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    # One fetch is one failure for the breaker, however many attempts it made.
    for fetch in range(3):
        assert urza.breaker.state == "closed"
        with pytest.raises(UrzaUnavailableError, match="after 3 attempts") as info:
            urza.fetch(manifest.artifact_id)
        assert isinstance(info.value.__cause__, ConnectionError)
        assert sleeps == [0.1, 0.15] * (fetch + 1)  # exponential, capped
    assert urza.breaker.state == "open" and urza.breaker.times_opened == 1
    reads = sum(flaky.reads.values())
    assert reads == 9
    with pytest.raises(UrzaUnavailableError, match="breaker is open"):
        urza.fetch(manifest.artifact_id)
    assert sum(flaky.reads.values()) == reads  # open: the store is not touched
    # Half-open trial while the store is still down: one read (no retries), open again.
    clock.now += 31
    with pytest.raises(UrzaUnavailableError, match="after 1 attempt:"):
        urza.fetch(manifest.artifact_id)
    assert sum(flaky.reads.values()) == reads + 1
    assert urza.breaker.state == "open" and urza.breaker.times_opened == 2
    # Recovery: the next trial succeeds and closes the breaker.
    flaky.down = False
    clock.now += 31
    payload, fetched = urza.fetch(manifest.artifact_id)
    assert fetched == manifest and urza.breaker.state == "closed"


def test_backoff_stays_at_its_cap_however_many_retries(store, trusted, caplog) -> None:
    """Retries are unbounded: from the 1025th attempt on ``backoff_s * 2**attempt`` raised
    OverflowError (a float times an int past a float's range), not the store's failure."""
    root, manifest = store
    sleeps: list[float] = []
    urza = client(
        str(root),
        trusted,
        retries=1030,
        backoff_s=0.1,
        backoff_max_s=2.0,
        clock=FakeClock(),
        sleep=sleeps.append,
    )
    urza._fs = FlakyFS(urza._fs)
    urza._fs.down = True
    caplog.set_level(logging.ERROR, logger="kasmina.urza.resilience")  # a warning per attempt
    with pytest.raises(UrzaUnavailableError, match="after 1031 attempts"):
        urza.get_manifest(manifest.artifact_id)
    assert len(sleeps) == 1030 and sleeps[:2] == [0.1, 0.2] and set(sleeps[5:]) == {2.0}


def test_breaker_opens_when_manifests_load_but_payloads_fail(store, trusted) -> None:
    """A fetch is one outcome: a manifest read that succeeds must not reset the count."""
    root, manifest = store
    urza = client(str(root), trusted, retries=1, breaker_threshold=3, clock=FakeClock())
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.fail_suffixes = (".pt2",)
    for _ in range(3):
        assert urza.breaker.state == "closed"
        with pytest.raises(UrzaUnavailableError, match="after 2 attempts"):
            urza.fetch(manifest.artifact_id)
    assert urza.breaker.state == "open" and urza.breaker.times_opened == 1
    assert flaky.reads_of(".manifest.json") == 3 and flaky.reads_of(".pt2") == 6
    with pytest.raises(UrzaUnavailableError, match="breaker is open"):
        urza.fetch(manifest.artifact_id)
    assert flaky.reads_of(".manifest.json") == 3  # open: not even the manifest is read


def test_answers_from_the_store_are_breaker_successes(store, trusted) -> None:
    """Missing or corrupt artifacts are answers: they reset the count and never open it."""
    root, manifest = store
    urza = client(str(root), trusted, breaker_threshold=2, clock=FakeClock())
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    with pytest.raises(UrzaUnavailableError):
        urza.fetch(manifest.artifact_id)
    flaky.down = False
    path = payload_path(root, manifest.artifact_id)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ArtifactIntegrityError):
        urza.fetch(manifest.artifact_id)
    with pytest.raises(ArtifactNotFoundError):
        urza.fetch("absent")
    flaky.down = True
    with pytest.raises(UrzaUnavailableError):
        urza.fetch(manifest.artifact_id)
    assert urza.breaker.state == "closed"  # the failures were not consecutive


def test_slow_store_times_out(store, trusted) -> None:
    root, manifest = store
    urza = client(str(root), trusted, timeout_s=0.05, retries=1, breaker_threshold=2)
    urza._fs = FlakyFS(urza._fs)
    urza._fs.delay_s = 0.5
    for _ in range(2):
        with pytest.raises(UrzaUnavailableError, match="after 2 attempts") as info:
            urza.fetch(manifest.artifact_id)
        assert isinstance(info.value.__cause__, TimeoutError)
    assert urza.breaker.state == "open"


def test_breaker_unit() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, reset_s=5.0, clock=clock)
    breaker.record_failure()
    assert breaker.allow() and breaker.state == "closed"
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"  # success reset the consecutive count
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 5
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one trial at a time
    clock.now += 5
    assert breaker.allow()  # the trial never reported back: another one may go
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0, reset_s=1.0)


def test_sixteen_concurrent_fetches_share_one_read(store, trusted) -> None:
    root, manifest = store
    urza = client(str(root), trusted)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.delay_s = 0.3
    barrier = threading.Barrier(16)
    results, errors = [], []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(urza.fetch(manifest.artifact_id))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and len(results) == 16
    assert flaky.reads_of(".pt2") == 1 and flaky.reads_of(".manifest.json") == 1
    assert all(r[0] is results[0][0] for r in results)
    stats = urza.stats()
    assert stats["fetches"] == 1 and stats["coalesced"] == 15
    # The next fetch after completion is a new one.
    urza.fetch(manifest.artifact_id)
    assert flaky.reads_of(".pt2") == 2


def test_coalesced_followers_share_the_failure(store, trusted) -> None:
    root, manifest = store
    urza = client(str(root), trusted, sleep=lambda s: None)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down, flaky.delay_s = True, 0.2
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            urza.fetch(manifest.artifact_id)
        except UrzaUnavailableError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(errors) == 8
    assert sum(flaky.reads.values()) == 1


def test_fetch_async_coalesces(store, trusted) -> None:
    root, manifest = store
    urza = client(str(root), trusted)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.delay_s = 0.2

    async def main():
        return await asyncio.gather(*(urza.fetch_async(manifest.artifact_id) for _ in range(4)))

    results = asyncio.run(main())
    assert all(r[1] == manifest for r in results)
    assert flaky.reads_of(".pt2") == 1
    # The specification's name: the verified payload alone, the same bytes.
    assert asyncio.run(urza.fetch_kernel(manifest.artifact_id)) == results[0][0]
    with pytest.raises(ArtifactIntegrityError):
        payload_path(root, manifest.artifact_id).write_bytes(b"forged")
        asyncio.run(client(str(root), trusted).fetch_kernel(manifest.artifact_id))


def test_verify_store_reports_each_artifact(store, publisher, trusted) -> None:
    root, manifest = store
    publish_payload(b"second", str(root), "bp", publisher, "second")
    payload_path(root, "second").write_bytes(b"SECOND")
    manifest_path(root, "deep").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    report = client(str(root), trusted).verify_store()
    assert report[manifest.artifact_id] == "ok"
    assert report["second"].startswith("ArtifactIntegrityError")
    assert report["deep"].startswith("ArtifactIntegrityError") and "nested" in report["deep"]


def test_an_unexpected_error_ends_the_half_open_trial(store, trusted, monkeypatch) -> None:
    """A trial that raises something no branch expects is a failure: the breaker never stays
    half-open with its one trial spent (every fetch refused until the next reset)."""
    root, manifest = store
    clock = FakeClock()
    urza = client(str(root), trusted, breaker_threshold=1, breaker_reset_s=30, clock=clock)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    with pytest.raises(UrzaUnavailableError):
        urza.fetch(manifest.artifact_id)
    assert urza.breaker.state == "open"
    flaky.down = False
    clock.now += 31
    monkeypatch.setattr(
        "kasmina.urza.client.verify_manifest", lambda *a, **k: (_ for _ in ()).throw(KeyError("x"))
    )
    with pytest.raises(KeyError):
        urza.fetch(manifest.artifact_id)
    assert urza.breaker.state == "open"  # a failure: it waits for the next reset
    monkeypatch.undo()
    clock.now += 31
    assert urza.fetch(manifest.artifact_id)[1] == manifest
    assert urza.breaker.state == "closed"


def test_a_breaker_opened_during_a_backoff_stops_the_retries(store, trusted) -> None:
    """Another operation opens the breaker while this fetch backs off after a failed read: no
    further attempt starts, and the fetch ends in ``UrzaUnavailableError`` at once."""
    root, manifest = store

    def sleep(_seconds: float) -> None:
        for _ in range(urza.breaker.threshold):  # other fetches failing meanwhile
            urza.breaker.record_failure()

    urza = client(str(root), trusted, retries=3, breaker_threshold=5, sleep=sleep)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    with pytest.raises(UrzaUnavailableError, match="breaker opened .*; not retrying") as info:
        urza.fetch(manifest.artifact_id)
    assert isinstance(info.value.__cause__, ConnectionError)
    assert flaky.reads_of(".manifest.json") == 1  # the 2nd of 4 attempts never started
    assert urza.breaker.state == "open"


def test_max_artifact_bytes_is_the_largest_payload_fetched(store, trusted) -> None:
    """A manifest that declares exactly ``max_artifact_bytes`` is fetched; one byte more is
    refused before the payload is opened ("declares more than", docs/design.md §6)."""
    root, manifest = store
    payload, fetched = client(str(root), trusted, max_artifact_bytes=manifest.size).fetch(
        manifest.artifact_id
    )
    assert fetched == manifest and len(payload) == manifest.size
    urza = client(str(root), trusted, max_artifact_bytes=manifest.size - 1)
    flaky = urza._fs = FlakyFS(urza._fs)
    with pytest.raises(ArtifactIntegrityError, match="above max_artifact_bytes"):
        urza.fetch(manifest.artifact_id)
    assert flaky.reads_of(".pt2") == 0


def test_verify_manifest_takes_a_manifest_of_exactly_max_bytes(publisher, trusted) -> None:
    raw = sign_manifest(Manifest("a1", "bp", "0" * 64, 3, (), "pub", 1.0, "2"), publisher).to_json()
    assert verify_manifest(raw, trusted, max_bytes=len(raw)).artifact_id == "a1"
    with pytest.raises(ArtifactIntegrityError, match=f"manifest larger than {len(raw) - 1} bytes"):
        verify_manifest(raw, trusted, max_bytes=len(raw) - 1)


def test_from_config_refuses_what_is_no_config() -> None:
    """``UrzaLibraryClient.from_config(None)`` raised AttributeError ('urza_url')."""
    with pytest.raises(TypeError, match="from_config takes a KasminaConfig, got NoneType"):
        UrzaLibraryClient.from_config(None)
