"""A store's URL checked, and the store opened, for ``UrzaLibraryClient``.

The URL is refused when a layer of its chain would read outside the client's bounded, timed
reads (a caching or archive layer) or when its authority does not parse. An HTTP store's
session gets the client's read timeout and the redirect guard (``kasmina.urza.redirects``), and
a signed URL's query is split off its root to follow each object's name.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, NamedTuple

from kasmina.urza.artifact import chain_layers, open_store
from kasmina.urza.redaction import redact, redact_urls, store_secrets

__all__ = ["ClientStore", "check_store_url", "is_http", "open_client_store"]

# fsspec layers that copy each whole object (the caches), or open and index the whole target
# when the client is built (the archives), before the client's bounded, timed reads apply.
_CACHING_LAYERS = ("simplecache", "filecache", "blockcache", "cached")
_ARCHIVE_LAYERS = ("tar", "zip", "libarchive")


class ClientStore(NamedTuple):
    """An opened store, as the client reads it."""

    fs: Any  # the fsspec filesystem
    root: str  # the store's directory on it, without a signed URL's query
    query: str  # a signed URL's query (``?sig=...``), put after each object's name; or ""
    open_kwargs: dict[str, Any]  # what each ``fs.open`` of a read is given


def check_store_url(url: str) -> None:
    """``ValueError`` for a URL the client refuses (``_check_chain``, ``_check_authority``, and
    a NUL character, which no URL holds raw and no local path can: a local store's every read
    failed as a transport error, retried and counted against the store)."""
    if "\0" in url:
        raise ValueError(f"store URL {redact_urls(url)!r} holds a NUL character")
    _check_chain(url)
    _check_authority(url)


def open_client_store(
    url: str, storage_options: dict[str, Any] | None, timeout_s: float, chunk_bytes: int
) -> ClientStore:
    """The store at ``url``, opened with ``storage_options`` (an HTTP store's session also given
    the read's ``timeout_s`` unless they name a ``timeout``, and the redirect guard)."""
    options = dict(storage_options or {})
    client = dict(options.get("client_kwargs") or {})  # the user's own (headers, trust_env)
    if url.lower().startswith(("http://", "https://")):
        import aiohttp  # fsspec's HTTP backend depends on it

        from kasmina.urza.redirects import REDIRECT_GUARD

        if "timeout" not in client:
            client["timeout"] = aiohttp.ClientTimeout(total=timeout_s)  # else 300 s
        # A redirect to another origin carrying the user's headers is refused.
        client["trace_configs"] = [*(client.get("trace_configs") or ()), REDIRECT_GUARD]
        options["client_kwargs"] = client
    fs, root = open_store(url, options)
    query = ""
    if is_http(fs) and "?" in root:
        root, _, query = root.partition("?")
        root, query = root.rstrip("/"), f"?{query}"
    # Elsewhere, the file's own read-ahead is one chunk at most. HTTP: one streaming GET
    # (block_size=0), which also works against servers that ignore Range. Passing a size
    # skips fsspec's HEAD probe (the streaming file ignores it), which would report any
    # failure, even a refused connection, as FileNotFoundError: the GET maps only a 404.
    open_kwargs: dict[str, Any] = {"block_size": chunk_bytes}
    if is_http(fs):
        open_kwargs = {"block_size": 0, "size": 1}
    return ClientStore(fs, root, query, open_kwargs)


def _check_chain(url: str) -> None:
    """``ValueError`` for a chained URL through a caching layer (``simplecache::http://...``):
    it copies each whole object to local disk before the client's bounded read sees a byte, so
    neither ``max_manifest_bytes`` nor a payload's declared size bounds the transfer, and over
    HTTP the client's timeout does not reach it either. Kasmina caches verified kernels itself
    (``GPUKernelCache``); give the store's own URL. An archive layer (``tar::``, ``zip::``) is
    refused too: it opens and indexes the whole archive when the client is built, outside any
    timeout (a FIFO there blocked the trainer's start for ever; a tar.gz is inflated whole)."""
    layers = [part.split("://", 1)[0].strip().lower() for part in chain_layers(url)[:-1]]
    caching = [layer for layer in layers if layer in _CACHING_LAYERS]
    if caching:
        raise ValueError(
            f"store URL {redact_urls(url)!r} goes through the caching layer {caching[0]!r}, "
            "which copies whole objects before Kasmina's bounded, timed reads apply: give the "
            "store's own URL (Kasmina caches verified kernels itself)"
        )
    archive = [layer for layer in layers if layer in _ARCHIVE_LAYERS]
    if archive:
        raise ValueError(
            f"store URL {redact_urls(url)!r} goes through the archive layer {archive[0]!r}, "
            "which reads the whole archive when the client is built, before Kasmina's bounded, "
            "timed reads apply: unpack the store and give its directory or URL"
        )


def _check_authority(url: str) -> None:
    """``ValueError`` for a store URL whose authority (``user:password@host:port``) does not
    parse: an unbalanced ``[`` (a typo'd IPv6 host, or a password with a ``[`` in it), or an
    HTTP store's port that is no number (a password with a raw ``/``, ``?`` or ``#``), or an
    HTTP store's that names no host (``http:///store``). The
    client was built, and each read of the store then failed as a transport error ("Invalid
    IPv6 URL", "port can't be converted to integer"), retried and counted against the store,
    when the URL itself was wrong; the second showed the password in every message. The
    message shows neither the URL's credentials nor any the parser's error quotes."""
    for part in chain_layers(url):
        if "://" not in part:
            continue
        try:
            split = urllib.parse.urlsplit(part)
        except ValueError as exc:
            reason = redact(str(exc), store_secrets(part, None))
            hint = ""
            if "[" in part or "]" in part:
                hint = (
                    ": '[' and ']' enclose an IPv6 host only (http://[::1]:8080/store); "
                    "percent-encode one anywhere else, in a user name or password too (%5B, %5D)"
                )
            raise ValueError(
                f"store URL {redact_urls(url)!r} is malformed ({reason}){hint}"
            ) from None
        if split.scheme.lower() in ("http", "https") and not _port_parses(split):
            # Most often a '/', '?' or '#' in a password, which ends the authority there: all
            # written before the last '@' is hidden, since no parse says where the secret ends.
            written = part.partition("://")[2].rpartition("@")[0]
            shown = redact_urls(url.replace(written, "***") if written else url)
            raise ValueError(
                f"store URL {shown!r} is malformed (its port is not a number from 0 to 65535): "
                "a '/', '?' or '#' ends the host part; percent-encode one in a user name or "
                "password (%2F, %3F, %23)"
            )
        if split.scheme.lower() in ("http", "https") and not split.hostname:
            raise ValueError(f"store URL {redact_urls(url)!r} is malformed (it names no host)")


def _port_parses(split: urllib.parse.SplitResult) -> bool:
    """Whether ``split``'s port is absent or a number from 0 to 65535."""
    try:
        return split.port is None or split.port >= 0  # ValueError: neither
    except ValueError:
        return False


def is_http(fs: Any) -> bool:
    """Whether ``fs`` is fsspec's HTTP(S) filesystem."""
    protocol = getattr(fs, "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return bool({"http", "https"} & set(protocols))
