"""Urza store reads are bounded and streamed: oversize manifests and payloads are refused after
reading at most their limit plus one chunk, and an abandoned read stops reading."""

from __future__ import annotations

import errno
import hashlib
import threading
import time
import uuid
from pathlib import Path

import pytest

from kasmina.errors import ArtifactIntegrityError, UrzaUnavailableError
from kasmina.urza.artifact import Manifest, read_bounded, sign_manifest
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_payload, resign_artifact
from kasmina.utils.keyring import Keyring
from tests.urza.helpers import FlakyFS, serve_directory

MiB = 1 << 20
PAYLOAD = bytes(range(256)) * 4  # 1024 bytes


@pytest.fixture
def store(tmp_path: Path, publisher: PublisherKey) -> Path:
    root = tmp_path / "store"
    publish_payload(PAYLOAD, str(root), "bp", publisher, "a1")
    return root


def client(url: str, trusted: TrustedPublishers, **kwargs) -> tuple[UrzaLibraryClient, FlakyFS]:
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("backoff_s", 0.0)
    urza = UrzaLibraryClient(url, trusted, **kwargs)
    flaky = urza._fs = FlakyFS(urza._fs)
    return urza, flaky


def declare(root: Path, publisher: PublisherKey, artifact_id: str, size: int) -> None:
    """A validly signed manifest declaring ``size`` bytes (and a hash nothing will match)."""
    manifest = Manifest(artifact_id, "bp", "0" * 64, size, (), "pub", 1.0, "2")
    (root / f"{artifact_id}.manifest.json").write_bytes(
        sign_manifest(manifest, publisher).to_json()
    )


def sparse(path: Path, size: int) -> None:
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)


@pytest.mark.parametrize("chunk", [64 * 1024, MiB])
def test_oversize_manifest_is_refused_after_a_bounded_read(store, trusted, chunk) -> None:
    sparse(store / "a1.manifest.json", 256 * MiB)
    urza, flaky = client(str(store), trusted, chunk_bytes=chunk)
    started = time.perf_counter()
    with pytest.raises(ArtifactIntegrityError, match=r"manifest is larger than 4194304 bytes"):
        urza.fetch("a1")
    assert flaky.bytes_of(".manifest.json") <= 4 * MiB + chunk
    assert flaky.reads_of(".pt2") == 0  # the payload is never touched
    assert urza.breaker.state == "closed"  # a refusal is an answer, not an outage
    assert time.perf_counter() - started < 5
    # A tighter configured limit applies to real manifests too.
    small, _ = client(str(store), trusted, max_manifest_bytes=100)
    with pytest.raises(ArtifactIntegrityError, match="max_manifest_bytes"):
        small.get_manifest("a1")


def test_dev_zero_manifest_is_refused_after_a_bounded_read(store, trusted) -> None:
    path = store / "a1.manifest.json"
    path.unlink()
    path.symlink_to("/dev/zero")
    urza, flaky = client(str(store), trusted, max_manifest_bytes=MiB, chunk_bytes=256 * 1024)
    with pytest.raises(ArtifactIntegrityError, match="manifest is larger than"):
        urza.get_manifest("a1")
    assert flaky.bytes_of(".manifest.json") <= MiB + 256 * 1024


def test_payload_larger_than_declared_is_refused_after_a_bounded_read(store, trusted) -> None:
    sparse(store / "a1.pt2", 600 * MiB)  # declared 1024 bytes, 600 MiB on disk (sparse)
    urza, flaky = client(str(store), trusted)
    with pytest.raises(ArtifactIntegrityError, match="payload is larger than 1024 bytes"):
        urza.fetch("a1")
    assert 0 < flaky.bytes_of(".pt2") <= 1024 + 1


def test_payload_declared_above_max_artifact_bytes_is_never_read(store, trusted, publisher) -> None:
    sparse(store / "big.pt2", 600 * MiB)
    declare(store, publisher, "big", 600 * MiB)
    urza, flaky = client(str(store), trusted, max_artifact_bytes=8 * MiB)
    with pytest.raises(ArtifactIntegrityError, match="above max_artifact_bytes"):
        urza.fetch("big")
    assert flaky.reads_of(".pt2") == 0 and flaky.bytes_of(".pt2") == 0
    # The default ceiling (1 GiB) applies without any setting.
    declare(store, publisher, "huge", 2 << 30)
    sparse(store / "huge.pt2", 2 << 30)
    with pytest.raises(ArtifactIntegrityError, match="above max_artifact_bytes"):
        client(str(store), trusted)[0].fetch("huge")


@pytest.mark.parametrize("declared", [1024, 8 * MiB])
def test_dev_zero_payload_is_refused_after_a_bounded_read(
    store, trusted, publisher, declared
) -> None:
    if declared != 1024:
        declare(store, publisher, "a1", declared)
    path = store / "a1.pt2"
    path.unlink()
    path.symlink_to("/dev/zero")
    urza, flaky = client(str(store), trusted)
    with pytest.raises(ArtifactIntegrityError, match=f"payload is larger than {declared} bytes"):
        urza.fetch("a1")
    assert flaky.bytes_of(".pt2") <= declared + 1


def test_streamed_hash_over_many_chunks(store, trusted) -> None:
    urza, flaky = client(str(store), trusted, chunk_bytes=7)
    payload, manifest = urza.fetch("a1")
    assert payload == PAYLOAD and manifest.verified
    assert flaky.bytes_of(".pt2") == len(PAYLOAD)
    data = bytearray(PAYLOAD)
    data[-1] ^= 1
    (store / "a1.pt2").write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        urza.fetch("a1")
    (store / "a1.pt2").write_bytes(PAYLOAD[:-1])
    with pytest.raises(ArtifactIntegrityError, match="payload is 1023 bytes"):
        urza.fetch("a1")


def test_memory_store_streams(publisher, trusted) -> None:
    url = f"memory://urza-{uuid.uuid4().hex}"
    publish_payload(PAYLOAD, url, "bp", publisher, "a1")
    urza, flaky = client(url, trusted, chunk_bytes=100)
    assert urza.fetch("a1")[0] == PAYLOAD
    assert flaky.bytes_of(".pt2") == len(PAYLOAD)


def test_memory_store_reads_do_not_move_each_other(publisher, trusted) -> None:
    """fsspec's ``memory://`` hands every reader the one stored buffer: a read made while
    another was part-way (two clients on one store, a fetch beside a publish) moved that one's
    position, so it read bytes twice and missed others, and a sound artifact was refused as
    corrupt. Here a second read runs, whole, between the first read's chunks."""
    import fsspec

    url = f"memory://urza-{uuid.uuid4().hex}"
    fs, root = fsspec.core.url_to_fs(url)
    path = f"{root}/blob"
    data = bytes(range(256)) * 40
    fs.pipe_file(path, data)
    inner: list[bytes] = []

    class Interleaving:
        def update(self, chunk: bytes) -> None:
            if not inner:
                inner.append(read_bounded(fs, path, len(data), what="w", why="w", chunk_bytes=7))

    got = read_bounded(
        fs, path, len(data), what="blob", why="test", chunk_bytes=1000, hasher=Interleaving()
    )
    assert got == data and inner == [data]
    with pytest.raises(ArtifactIntegrityError, match="larger than 100 bytes"):
        read_bounded(fs, path, 100, what="blob", why="test")
    publish_payload(PAYLOAD, url, "bp", publisher, "a1")
    a, b = UrzaLibraryClient(url, trusted), UrzaLibraryClient(url, trusted)
    assert a.fetch("a1")[0] == b.fetch("a1")[0] == PAYLOAD


def test_http_store_refuses_an_oversize_payload(store, trusted) -> None:
    sparse(store / "a1.pt2", 600 * MiB)
    with serve_directory(store) as url:
        urza = UrzaLibraryClient(url, trusted, retries=0, timeout_s=5.0)
        started = time.perf_counter()
        with pytest.raises(ArtifactIntegrityError, match="payload is larger than 1024 bytes"):
            urza.fetch("a1")
        assert time.perf_counter() - started < 5


def test_abandoned_read_stops_reading(store, trusted, publisher) -> None:
    """A payload read that times out stops at its next chunk instead of reading on."""
    declare(store, publisher, "a1", 512 * MiB)
    path = store / "a1.pt2"
    path.unlink()
    path.symlink_to("/dev/zero")
    chunk = 64 * 1024
    urza, flaky = client(str(store), trusted, timeout_s=0.2, chunk_bytes=chunk)
    flaky.chunk_delay_s = 0.01  # unbounded, this read would take 80 s
    before = set(threading.enumerate())
    with pytest.raises(UrzaUnavailableError) as info:
        urza.fetch("a1")
    assert isinstance(info.value.__cause__, TimeoutError)
    workers = [t for t in threading.enumerate() if t not in before and t.name == "urza-io"]
    for t in workers:
        t.join(timeout=2)
    assert not any(t.is_alive() for t in workers)
    read = flaky.bytes_of(".pt2")
    assert 0 < read <= (0.2 / 0.01 + 3) * chunk  # at most the timeout's worth, plus one chunk
    time.sleep(0.05)
    assert flaky.bytes_of(".pt2") == read


def test_read_bounded_unit(tmp_path) -> None:
    from fsspec.implementations.local import LocalFileSystem

    fs = LocalFileSystem()
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    hasher = hashlib.sha256()
    assert read_bounded(fs, str(path), 6, what="f", why="t", chunk_bytes=4, hasher=hasher) == (
        b"abcdef"
    )
    assert hasher.hexdigest() == hashlib.sha256(b"abcdef").hexdigest()
    with pytest.raises(ArtifactIntegrityError, match=r"f is larger than 5 bytes \(t\)"):
        read_bounded(fs, str(path), 5, what="f", why="t", chunk_bytes=4)
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(TimeoutError):
        read_bounded(fs, str(path), 6, what="f", why="t", cancelled=cancelled)
    with pytest.raises(FileNotFoundError):
        read_bounded(fs, str(tmp_path / "missing"), 6, what="f", why="t")
    with pytest.raises(ValueError):
        read_bounded(fs, str(path), 6, what="f", why="t", chunk_bytes=0)
    with pytest.raises(ValueError):
        read_bounded(fs, str(path), -1, what="f", why="t")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")  # a limit of 0 (a manifest declaring 0 bytes) reads an empty file
    assert read_bounded(fs, str(empty), 0, what="f", why="t") == b""
    with pytest.raises(ArtifactIntegrityError, match="larger than 0 bytes"):
        read_bounded(fs, str(path), 0, what="f", why="t")


def test_an_entry_that_is_not_a_file_is_that_artifacts_problem(store, trusted, publisher) -> None:
    """A directory where a manifest or a payload should be is an answer from the store, like a
    corrupt manifest: ``ArtifactIntegrityError``, not retried, a breaker success. A transport
    error is still retried and still opens the breaker."""
    (store / "d.manifest.json").mkdir()
    declare(store, publisher, "p", len(PAYLOAD))
    (store / "p.pt2").mkdir()
    urza, flaky = client(str(store), trusted, retries=2, breaker_threshold=1)
    with pytest.raises(ArtifactIntegrityError, match="'d': manifest is not a readable file"):
        urza.get_manifest("d")
    with pytest.raises(ArtifactIntegrityError, match="'p': payload is not a readable file"):
        urza.fetch("p")
    assert urza.verify_store() == {
        "a1": "ok",
        "d": "ArtifactIntegrityError: artifact 'd': manifest is not a readable file "
        "(Is a directory)",
        "p": "ArtifactIntegrityError: artifact 'p': payload is not a readable file "
        "(Is a directory)",
    }
    stats = urza.stats()
    assert stats["read_failures"] == 0 and stats["breaker_state"] == "closed"
    assert flaky.reads_of("d.manifest.json") == 2  # once per call: never retried
    flaky.down = True
    with pytest.raises(UrzaUnavailableError, match="after 3 attempts"):
        urza.get_manifest("a1")
    assert urza.stats()["breaker_state"] == "open"


@pytest.mark.parametrize(
    "error",
    [PermissionError(errno.EACCES, "Access Denied"), OSError(errno.ENXIO, "No such device")],
    ids=["denied", "enxio"],
)
def test_a_remote_stores_os_error_is_a_transport_failure(store, trusted, error) -> None:
    """Only on a local store does a PermissionError or an ENXIO say what one entry is; from
    any other store (an object store's 403 is a PermissionError) it says nothing about the
    artifact, so it is retried and counted against the store."""
    urza, flaky = client(str(store), trusted, retries=1, breaker_threshold=1)
    opened = flaky.open

    def failing(path: str, mode: str = "rb", **kwargs):
        opened(path, mode, **kwargs).close()  # counted as a read
        raise error

    flaky.open = failing  # type: ignore[method-assign]
    with pytest.raises(UrzaUnavailableError, match="after 2 attempts"):
        urza.get_manifest("a1")
    assert flaky.reads_of(".manifest.json") == 2
    assert urza.stats()["breaker_state"] == "open"


def test_resign_reports_a_directory_manifest_as_that_artifacts_problem(store, publisher) -> None:
    (store / "d.manifest.json").mkdir()
    (store / "loop.manifest.json").symlink_to("loop.manifest.json")  # ELOOP on a local store
    legacy = Keyring({"old": b"k" * 32})
    for artifact_id in ("d", "loop"):
        with pytest.raises(ArtifactIntegrityError, match="manifest is not a readable file"):
            resign_artifact(str(store), artifact_id, publisher, legacy)


class _IndexPage:
    """A loopback HTTP server that answers every GET with ``body`` (an index page)."""

    def __init__(self, body: bytes) -> None:
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:  # the client stopped reading: refused
                    pass

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/urza"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_an_http_listing_is_scanned_in_linear_time(trusted) -> None:
    """fsspec's HTTP listing scanned the index page with a regular expression that backtracks:
    a 1.2 KB page ending in "<a " and spaces held the GIL for seconds (about 8x as long for
    each doubling), so the listing's timeout never fired and every other thread stopped."""
    page = b'<a href="a1.manifest.json">a1</a> <a ' + b" " * 1200
    with _IndexPage(page) as url:
        urza = UrzaLibraryClient(url, trusted, timeout_s=2.0, retries=0)
        assert urza.list_artifacts() == ["a1"]


def test_an_http_listing_is_a_bounded_read(trusted, monkeypatch) -> None:
    import kasmina.urza.client as client_module

    monkeypatch.setattr(client_module, "MAX_LISTING_BYTES", 4096)
    links = b"".join(b'<a href="x%d.manifest.json">x</a>\n' % i for i in range(2000))
    with _IndexPage(links) as url:
        urza = UrzaLibraryClient(url, trusted, timeout_s=5.0, retries=0)
        with pytest.raises(ArtifactIntegrityError, match="index page is larger than 4096"):
            urza.list_artifacts()


def test_the_links_of_an_index_page_that_name_the_stores_files() -> None:
    from kasmina.urza.client import _linked_children

    base = "http://h/urza/"
    page = (
        "<a href=\"a.manifest.json\">a</a> <A HREF = 'b.pt2'>b</A> <a href=c.manifest.json>"
        '<a href="/urza/d%20e.manifest.json?x=1#top"> <a href="http://h/urza/f.manifest.json">'
        '<a href="/other/g.manifest.json"> <a href="http://evil/urza/h.manifest.json">'
        '<a href="sub/i.manifest.json"> <a href="../j.manifest.json"> text href=k.manifest.json'
        ' <a title="href=zz" href="l.manifest.json"> <a href="unterminated'
    )
    names = list(_linked_children(page, base))
    assert names == [
        "a.manifest.json",
        "b.pt2",
        "c.manifest.json",
        "d e.manifest.json",
        "f.manifest.json",
        "k.manifest.json",  # a link in text is taken too: the listing is unverified anyway
        "l.manifest.json",
        "unterminated",
    ]


@pytest.mark.parametrize(
    "url", ["simplecache::http://127.0.0.1:9/u", "filecache::memory://u", "blockcache::s3://b/u"]
)
def test_a_caching_layer_in_the_store_url_is_refused(url, trusted) -> None:
    """``simplecache::http://...`` copied each whole object to local disk before the bounded
    read saw a byte, under aiohttp's default timeout of 300 s rather than ``timeout_s``: an
    endless manifest filled the disk from an abandoned read for minutes."""
    with pytest.raises(ValueError, match="caching layer"):
        UrzaLibraryClient(url, trusted)


@pytest.mark.parametrize("layer", ["tar", "zip"])
def test_an_archive_layer_in_the_store_url_is_refused_before_it_opens_anything(
    layer, fifo, trusted
) -> None:
    """``tar://x::<path>`` (or ``zip::``) opened and indexed the whole archive inside the
    client's constructor, outside its timeout: a FIFO there blocked the constructor (and a
    manager's start) for ever, ``timeout_s=1`` notwithstanding. Refused before it is opened."""
    with pytest.raises(ValueError, match="archive layer"):
        UrzaLibraryClient(f"{layer}://x::{fifo}", trusted, timeout_s=1.0, retries=0)


def test_invalid_names_in_a_listing_are_logged_in_one_line(store, trusted, caplog) -> None:
    for i in range(50):
        (store / f"-bad{i}.manifest.json").write_bytes(b"{}")
    urza = UrzaLibraryClient(str(store), trusted)
    with caplog.at_level("WARNING", logger="kasmina.urza.client"):
        assert urza.list_artifacts() == ["a1"]
    assert len(caplog.records) == 1 and "ignoring 50 store entries" in caplog.text
