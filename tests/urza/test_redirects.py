"""An HTTP store's redirects: one to another origin is refused while the request carries a
header aiohttp would send there (the user's API key); others are followed."""

from __future__ import annotations

import functools
import http.server
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kasmina.errors import UrzaUnavailableError
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.publish import publish_payload
from tests.urza.helpers import serve

API_KEY = "S3CRET-API-KEY"
PAYLOAD = b"not a real kernel: fetch verifies, it does not deserialise"


@pytest.fixture
def root(tmp_path: Path, publisher: PublisherKey) -> Path:
    """A local store holding artifact ``a1``."""
    publish_payload(PAYLOAD, str(tmp_path), "bp", publisher, "a1")
    return tmp_path


def recording(root: Path, seen: list[tuple[str, dict[str, str]]], redirect: Any = None) -> Any:
    """A handler serving ``root`` that records each request's path and headers; for a path
    ``redirect(path)`` maps to a location, it answers 302 to that location instead."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return None

        def do_GET(self) -> None:
            seen.append((self.path, dict(self.headers.items())))
            location = redirect(self.path) if redirect else None
            if location is None:
                super().do_GET()
                return
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return functools.partial(Handler, directory=str(root))


@pytest.fixture
def two_origins(root: Path) -> Iterator[tuple[str, list, list]]:
    """The store's URL on one loopback server, which answers every GET with a 302 to the same
    path on a second server (another port: another origin), and what each server received."""
    at_store: list[tuple[str, dict[str, str]]] = []
    elsewhere: list[tuple[str, dict[str, str]]] = []
    with serve(recording(root, elsewhere)) as other:
        with serve(recording(root, at_store, lambda path: other + path)) as url:
            yield url, at_store, elsewhere


def fetch(url: str, trusted: TrustedPublishers, **kwargs: Any) -> bytes:
    urza = UrzaLibraryClient(url, trusted, timeout_s=5.0, backoff_s=0.0, **kwargs)
    try:
        return urza.fetch("a1")[0]
    finally:
        urza.close()


@pytest.mark.parametrize("where", ["client_kwargs", "storage_options"])
def test_a_redirect_to_another_origin_carrying_an_api_key_is_refused(
    two_origins: tuple[str, list, list], trusted: TrustedPublishers, where: str
) -> None:
    """aiohttp drops only Authorization, Cookie and Proxy-Authorization on a redirect to
    another origin: the store's ``X-Api-Key`` went to the other host. The redirect is refused
    before the other host is asked, once (not retried), and the error names the header, not
    its value. A ``trace_configs`` of the user's own is kept, and their dicts left alone."""
    url, at_store, elsewhere = two_origins
    started: list[str] = []

    async def on_start(session: Any, context: Any, params: Any) -> None:
        started.append(str(params.url))

    own = aiohttp.TraceConfig()
    own.on_request_start.append(on_start)
    headers = {"headers": {"X-Api-Key": API_KEY}}
    client_kwargs = {**headers, "trace_configs": [own]}
    options = {"client_kwargs": client_kwargs} if where == "client_kwargs" else headers
    with pytest.raises(UrzaUnavailableError, match="another origin; redirect refused") as raised:
        fetch(url, trusted, retries=2, storage_options=options)
    assert "X-Api-Key" in str(raised.value) and API_KEY not in str(raised.value)
    assert elsewhere == []  # the other host was never asked
    assert [path for path, _ in at_store] == ["/a1.manifest.json"]  # one attempt
    assert client_kwargs["trace_configs"] == [own] and "timeout" not in client_kwargs
    assert started == ([f"{url}/a1.manifest.json"] if where == "client_kwargs" else [])


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer T0KEN-0123"}])
def test_a_redirect_to_another_origin_without_such_headers_is_followed(
    two_origins: tuple[str, list, list], trusted: TrustedPublishers, headers: Any
) -> None:
    """A signed URL or a CDN on another origin: followed when no header of the user's would
    reach it (an Authorization header is dropped by aiohttp itself)."""
    url, _, elsewhere = two_origins
    options = {"headers": headers} if headers else None
    assert fetch(url, trusted, storage_options=options) == PAYLOAD
    assert [path for path, _ in elsewhere] == ["/a1.manifest.json", "/a1.pt2"]
    assert not [h for _, got in elsewhere for h in got if h.lower() == "authorization"]


@pytest.mark.parametrize("absolute", [False, True])
def test_a_redirect_within_the_stores_origin_keeps_its_headers(
    root: Path, trusted: TrustedPublishers, absolute: bool
) -> None:
    """A store that moved within its own origin: followed, the API key sent on."""
    seen: list[tuple[str, dict[str, str]]] = []
    base: list[str] = []

    def moved(path: str) -> str | None:
        if not path.startswith("/old/"):
            return None
        return (base[0] if absolute else "") + path.removeprefix("/old")

    with serve(recording(root, seen, moved)) as url:
        base.append(url)
        options = {"client_kwargs": {"headers": {"X-Api-Key": API_KEY}}}
        assert fetch(f"{url}/old", trusted, storage_options=options) == PAYLOAD
    assert [path for path, _ in seen] == [
        "/old/a1.manifest.json", "/a1.manifest.json", "/old/a1.pt2", "/a1.pt2"
    ]  # fmt: skip
    assert all(got.get("X-Api-Key") == API_KEY for _, got in seen)
