"""Shared test helpers for the Urza, kernel and cache tests."""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.server
import io
import json
import pathlib
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class Trap:
    """Unpickling this writes ``path``: proof that something was deserialised."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.write_text, (pathlib.Path(self.path), "deserialised"))


def arm_pt2(payload: bytes, marker: pathlib.Path) -> bytes:
    """A copy of a real ``.pt2`` whose first weight is a pickle that writes ``marker`` when
    ``torch.export.load`` reads it (the format allows pickled weights)."""
    src = zipfile.ZipFile(io.BytesIO(payload))
    config_name = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
    config = json.loads(src.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    weight_name = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
    trap = io.BytesIO()
    torch.save(Trap(marker), trap)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == config_name:
                data = json.dumps(config).encode()
            elif info.filename == weight_name:
                data = trap.getvalue()
            dst.writestr(info, data)
    return out.getvalue()


class FlakyFS:
    """Wraps an fsspec filesystem: can be taken down (all paths, or those ending in one of
    ``fail_suffixes``), slowed (per open, and per chunk read), and counts opens and the bytes
    actually read per path."""

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        self.down = False
        self.fail_suffixes: tuple[str, ...] = ()
        self.delay_s = 0.0
        self.chunk_delay_s = 0.0
        self.reads: dict[str, int] = {}
        self.bytes_read: dict[str, int] = {}
        self._lock = threading.Lock()

    def _enter(self, path: str) -> None:
        with self._lock:
            self.reads[path] = self.reads.get(path, 0) + 1
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down or (self.fail_suffixes and str(path).endswith(self.fail_suffixes)):
            raise ConnectionError("store unreachable")

    def cat_file(self, path: str, **kwargs: Any) -> bytes:
        self._enter(path)
        data = self.fs.cat_file(path, **kwargs)
        self._count(path, len(data))
        return data

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> CountingFile:
        self._enter(path)
        return CountingFile(self.fs.open(path, mode, **kwargs), self, path)

    def ls(self, path: str, **kwargs: Any) -> Any:
        self._enter(path)
        return self.fs.ls(path, **kwargs)

    def _count(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_read[path] = self.bytes_read.get(path, 0) + n

    def reads_of(self, suffix: str) -> int:
        with self._lock:
            return sum(n for p, n in self.reads.items() if p.endswith(suffix))

    def bytes_of(self, suffix: str) -> int:
        with self._lock:
            return sum(n for p, n in self.bytes_read.items() if p.endswith(suffix))


class CountingFile:
    """A file from ``FlakyFS.open``: counts the bytes each ``read`` returns."""

    def __init__(self, f: Any, owner: FlakyFS, path: str) -> None:
        self.f, self.owner, self.path = f, owner, path

    def read(self, n: int = -1) -> bytes:
        if self.owner.chunk_delay_s:
            time.sleep(self.owner.chunk_delay_s)
        data = self.f.read(n)
        self.owner._count(self.path, len(data))
        return data

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FakeClock:
    """A monotonic clock the test moves; ``sleep`` advances it and records each sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@contextmanager
def serve_directory(directory: pathlib.Path) -> Iterator[str]:
    """A real HTTP server on loopback (port 0) serving ``directory``; yields its URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            return None

    with serve(functools.partial(Quiet, directory=str(directory))) as url:
        yield url


@contextmanager
def serve(handler: Any) -> Iterator[str]:
    """A real HTTP server on loopback (port 0) answering with ``handler``; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class StalledServer:
    """A loopback HTTP store whose payload responses stall halfway until ``release``."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.released = threading.Event()
        self._requests = threading.Condition()
        self.payload_requests = 0
        owner = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                if not self.path.endswith(".pt2") or owner.released.is_set():
                    super().do_GET()
                    return
                data = (directory / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                with owner._requests:
                    owner.payload_requests += 1
                    owner._requests.notify_all()
                # Bounded only so a broken teardown cannot hang the session.
                owner.released.wait(timeout=60)
                try:
                    self.wfile.write(data[len(data) // 2 :])
                except OSError:  # the client gave up and closed the connection
                    pass

        handler = functools.partial(Handler, directory=str(directory))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def wait_for_payload_requests(self, n: int, timeout: float = 10.0) -> None:
        with self._requests:
            assert self._requests.wait_for(lambda: self.payload_requests >= n, timeout)

    def release(self) -> None:
        self.released.set()

    def __enter__(self) -> StalledServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


def io_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "urza-io")


def wait_for_io_threads(at_most: int, timeout: float = 10.0) -> None:
    """Poll (bounded) until at most ``at_most`` ``urza-io`` threads are alive."""
    end = time.monotonic() + timeout
    while io_threads() > at_most and time.monotonic() < end:
        time.sleep(0.01)
    assert io_threads() <= at_most


def legacy_manifest(
    payload: bytes, artifact_id: str, key_id: str, key: bytes, created: float = 1_700_000_000.0
) -> bytes:
    """A version 1 manifest exactly as the retired HMAC scheme wrote it (written out here, since
    no code of the library writes one any more)."""
    data = {
        "artifact_id": artifact_id,
        "blueprint": "bp",
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "input_spec": [],
        "key_id": key_id,
        "created": created,
        "torch_version": "2.4.0",
        "format": "torch.export/pt2",
    }
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).encode("ascii")
    data["signature"] = hmac.new(key, canonical, hashlib.sha256).hexdigest()
    return json.dumps(data, sort_keys=True, indent=2).encode()


class PairRows(nn.Module):
    """Mixes each row with its neighbour: exported, it takes an even number of rows only (a
    condition of its program's input checks, not of its signed input shape ``[*, width]``)."""

    def __init__(self, width: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f = x.shape
        pairs = x.reshape(b // 2, 2, f).mean(1, keepdim=True).expand(b // 2, 2, f)
        return x + torch.tanh(self.lin(pairs.reshape(b, f)))
