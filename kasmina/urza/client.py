"""Urza: the artifact store seeds' kernels are loaded from (docs/design.md §6).

A store is any fsspec URL (a local directory by default; ``memory://``, ``http://``, object
stores work the same way) holding two files per artifact, side by side::

    <artifact_id>.pt2            the torch.export program (payload)
    <artifact_id>.manifest.json  its signed manifest (kasmina.urza.artifact.Manifest)

The manifest is written first, claiming the id (``kasmina.urza.publish``): until its payload
lands the artifact is listed, and a fetch finds it missing (``kasmina urza verify`` says so).
``UrzaLibraryClient.fetch`` returns payload bytes only after the manifest's Ed25519 signature
(checked against the client's ``TrustedPublishers``: public keys only, so a trainer holds nothing
that could sign an artifact), size and SHA-256 verify; it never deserialises anything
(``GPUKernel.from_binary`` does, after checking again). Reads are bounded and streamed: a
manifest above ``max_manifest_bytes``, or a payload longer than its manifest declares (or above
``max_artifact_bytes``), is refused after at most the limit plus one chunk, and the payload is
hashed as it streams. Concurrent fetches of one artifact share a single read.

How each read is run is ``kasmina.urza.resilience``'s: every store read has a timeout (an
abandoned read stops at its next chunk), failed reads are retried with exponential backoff, a
circuit breaker (one success or one failure per fetch, manifest and payload together) stops
hammering a store that keeps failing, and a fetch may carry a deadline (a ``time.monotonic()``
instant): the whole fetch, every read, retry and backoff sleep included, ends by it. Reads run
on ``urza-io`` threads, and a client never has more than ``max_stalled_reads`` of them alive,
abandoned ones included: a store that hangs in a blocking call (a FIFO, a stalled HTTP server)
cannot make the thread count grow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any

from kasmina.errors import ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError
from kasmina.urza.artifact import (
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    PAYLOAD_SUFFIX,
    READ_CHUNK_BYTES,
    Manifest,
    read_bounded,
    validate_artifact_id,
    verify_manifest,
    verify_payload_digest,
)
from kasmina.urza.keys import TrustedPublishers
from kasmina.urza.redaction import describe_error, redact_urls, store_secrets
from kasmina.urza.resilience import (
    MAX_STALLED_READS,
    Budget,
    CircuitBreaker,
    ReadGuard,
    _DeadlineExpired,
    check_deadline,
    check_store_settings,
)
from kasmina.urza.store_url import check_store_url, is_http, open_client_store
from kasmina.utils.checks import check_positive_int
from kasmina.utils.locks import fork_safe

logger = logging.getLogger(__name__)

__all__ = ["UrzaLibraryClient"]

# Default payload ceiling: a kernel is a small module, so this is generous.
MAX_ARTIFACT_BYTES = 1 << 30
# An HTTP store's index page is read up to this many bytes (about 100,000 artifacts' links).
MAX_LISTING_BYTES = 16 << 20
_HREF = re.compile("href", re.IGNORECASE)
_UNQUOTED_VALUE = re.compile(r"[^\s>]*")


class UrzaLibraryClient:
    """Reads and verifies artifacts from one store (see the module docstring).

    **Keys.** ``publishers`` are the publisher public keys this client trusts, by key id: a
    ``TrustedPublishers``, or a mapping of key id to public key (base64 or hex of the 32 raw
    bytes) turned into one. A manifest signed by any other key is refused. An HMAC ``Keyring``
    or a private ``PublisherKey`` is refused with ``TypeError``: a reader must hold nothing
    that can sign.

    **Deadlines.** ``fetch`` and ``get_manifest`` take ``deadline``, an instant of ``clock``
    (``time.monotonic`` unless injected): each read waits at most ``min(timeout_s, time
    left)``, no backoff sleep runs past the deadline (a retry that could not start before it
    is not waited for), and a coalesced follower waits for the shared fetch only until its own
    deadline. Expiry raises ``UrzaUnavailableError`` ("... did not finish within its deadline").
    How an expiry counts for the breaker: ``kasmina.urza.resilience.ReadGuard``.

    **Threads.** Reads run on ``urza-io`` daemon threads, since a blocking syscall cannot be
    interrupted; a read that overruns is abandoned, not killed. At most ``max_stalled_reads``
    such threads are alive at once, abandoned ones still blocked included; a read that finds
    every slot held by an abandoned read is refused (``stats()["reads_refused_stalled"]``), one
    that finds slots held by live reads waits for one (``ReadGuard`` again).

    **Close.** ``close`` (from any thread) also ends the fetches under way: no further read
    attempt or backoff starts, and a caller waiting on a read stops waiting and gets
    ``RuntimeError`` (the read's thread is abandoned). ``clock`` and ``sleep`` (the backoff
    wait) are injected by tests; the default backoff wait is one that ``close`` cuts short.

    **HTTP.** ``storage_options`` go to fsspec; an HTTP store's ``client_kwargs`` (aiohttp's
    session) get the read's ``timeout_s`` unless they name a ``timeout``, and a redirect to
    another origin is refused (``UrzaUnavailableError``) while the request carries a header
    aiohttp would send on there, such as an ``X-Api-Key`` (``kasmina.urza.redirects``).

    Timeouts, retries, deadlines, the breaker and the I/O threads are the ``ReadGuard``'s; this
    class says what is read and verifies it.
    """

    def __init__(
        self,
        url: str,
        publishers: TrustedPublishers | Mapping[str, str],
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        breaker_threshold: int = 5,
        breaker_reset_s: float = 30.0,
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
        max_artifact_bytes: int = MAX_ARTIFACT_BYTES,
        chunk_bytes: int = READ_CHUNK_BYTES,
        max_stalled_reads: int = MAX_STALLED_READS,
        storage_options: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        if isinstance(url, os.PathLike):
            url = os.fspath(url)
        if not isinstance(url, str):
            raise TypeError(f"url must be a store's path or URL (a str), got {type(url).__name__}")
        store = check_store_settings(
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            breaker_threshold=breaker_threshold,
            breaker_reset_s=breaker_reset_s,
        )
        max_manifest_bytes, max_artifact_bytes, chunk_bytes, max_stalled_reads = (
            check_positive_int(name, value)
            for name, value in (
                ("max_manifest_bytes", max_manifest_bytes),
                ("max_artifact_bytes", max_artifact_bytes),
                ("chunk_bytes", chunk_bytes),
                ("max_stalled_reads", max_stalled_reads),
            )
        )
        check_store_url(url)
        self.url = redact_urls(url)  # as messages and repr show it: no credentials
        self.publishers = _trusted(publishers)
        self.max_manifest_bytes = max_manifest_bytes
        self.max_artifact_bytes = max_artifact_bytes
        self.chunk_bytes = chunk_bytes
        self.breaker = CircuitBreaker(breaker_threshold, breaker_reset_s, clock)
        self._clock = clock
        # Guards the counters and the in-flight map here and the guard's I/O thread counts.
        self._lock = fork_safe(threading.Lock())
        self._guard = ReadGuard(
            url,
            self.breaker,
            self._lock,
            timeout_s=float(store["timeout_s"]),
            retries=store["retries"],
            backoff_s=float(store["backoff_s"]),
            backoff_max_s=float(store["backoff_max_s"]),
            max_stalled_reads=max_stalled_reads,
            clock=clock,
            sleep=sleep,
            secrets=store_secrets(url, storage_options),
        )
        self._fs, self._root, self._query, self._open_kwargs = open_client_store(
            url, storage_options, self.timeout_s, chunk_bytes
        )
        self._inflight: dict[str, Future[tuple[bytes, Manifest]]] = {}
        self._stats = {"fetches": 0, "coalesced": 0}
        fork_safe(self)  # ``_at_fork_reinit``

    def _at_fork_reinit(self) -> None:
        """After ``fork()``, in the child: the fetches in flight were other threads', gone
        there, and never end (a fetch of the same id waited on one for good, without a
        deadline): they are forgotten, and so are the parent's store reads (``ReadGuard``).
        The lock they were taken under is made free by its own ``fork_safe``."""
        self._inflight.clear()
        self._guard.forget_reads()

    @classmethod
    def from_config(
        cls, config: Any, publishers: TrustedPublishers | None = None
    ) -> UrzaLibraryClient:
        """From a ``KasminaConfig``; the trusted publishers default to
        ``config.load_trusted_publishers()`` (``urza_trusted_publishers`` and
        ``urza_publishers_file``)."""
        if not callable(getattr(config, "store_settings", None)):
            raise TypeError(f"from_config takes a KasminaConfig, got {type(config).__name__}")
        return cls(
            config.urza_url,
            publishers if publishers is not None else config.load_trusted_publishers(),
            **config.store_settings(),
        )

    @property
    def timeout_s(self) -> float:
        """Seconds one store read may take (the ``ReadGuard``'s setting)."""
        return self._guard.timeout_s

    @property
    def retries(self) -> int:
        """Retries of a failed read (the ``ReadGuard``'s setting)."""
        return self._guard.retries

    @property
    def backoff_s(self) -> float:
        """The first backoff between retries, doubled per retry (the ``ReadGuard``'s setting)."""
        return self._guard.backoff_s

    @property
    def backoff_max_s(self) -> float:
        """The longest backoff between retries (the ``ReadGuard``'s setting)."""
        return self._guard.backoff_max_s

    @property
    def max_stalled_reads(self) -> int:
        """The most ``urza-io`` threads alive at once (the ``ReadGuard``'s setting)."""
        return self._guard.max_stalled_reads

    # --- public API ---------------------------------------------------------------------

    def list_artifacts(self) -> list[str]:
        """Ids of the artifacts whose manifest is in the store (unverified), sorted.

        An HTTP store's listing is its index page, read as any other store read (streamed, at
        most ``MAX_LISTING_BYTES``, within ``timeout_s``) and scanned for links in linear time:
        fsspec's own HTTP listing reads the page whole and scans it with a regular expression
        that a page of a few kilobytes can hold for minutes, holding the GIL."""
        http = is_http(self._fs)

        def listing(cancelled: threading.Event) -> list[str]:
            if not http:
                entries = self._fs.ls(self._root, detail=False)
                return [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
            page = self._read_bounded(
                self._root + "/" + self._query, MAX_LISTING_BYTES, "the store's index page",
                "MAX_LISTING_BYTES", cancelled,
            )  # fmt: skip
            return list(_linked_children(page.decode("utf-8", "replace"), self._root + "/"))

        try:
            names = self._guard.operation(
                "listing", None, lambda budget: self._guard.call(listing, budget)
            )
        except FileNotFoundError:
            return []
        ids, invalid = set(), []
        for name in names:
            if name.endswith(MANIFEST_SUFFIX):
                try:
                    ids.add(validate_artifact_id(name[: -len(MANIFEST_SUFFIX)]))
                except ValueError:
                    invalid.append(name)
        if invalid:  # one line for them all: a store may hold thousands
            shown_names = ", ".join(repr(n[:80]) for n in invalid[:3])
            logger.warning(
                "ignoring %d store entr%s with an invalid artifact id: %s%s", len(invalid),
                "y" if len(invalid) == 1 else "ies", shown_names, ", ..." * (len(invalid) > 3),
            )  # fmt: skip
        return sorted(ids)

    def get_manifest(self, artifact_id: str, *, deadline: float | None = None) -> Manifest:
        """The artifact's verified manifest (signature checked; payload not read).

        ``deadline`` bounds the read and its retries as for ``fetch``."""
        validate_artifact_id(artifact_id)
        check_deadline(deadline)
        return self._guard.operation(
            f"manifest read of artifact {artifact_id!r}",
            deadline,
            lambda budget: self._read_manifest(artifact_id, budget),
        )

    def fetch(self, artifact_id: str, *, deadline: float | None = None) -> tuple[bytes, Manifest]:
        """Payload bytes and manifest, both verified. Concurrent calls for one id share a read.

        With ``deadline`` (an instant of the client's clock, ``time.monotonic`` by default) the
        call returns or raises by then, however long the shared read takes: a follower stops
        waiting at its own deadline and the leader's fetch goes on for the others. A follower
        whose leader ran out of the leader's own time fetches anew if it has time left. A
        deadline that is no finite number (a NaN read as none) is a ``ValueError``.
        """
        validate_artifact_id(artifact_id)
        check_deadline(deadline)
        while True:
            with self._lock:
                future = self._inflight.get(artifact_id)
                leader = future is None
                if future is None:
                    future = self._inflight[artifact_id] = Future()
                    self._stats["fetches"] += 1
                else:
                    self._stats["coalesced"] += 1
            if leader:
                return self._lead(artifact_id, future, deadline)
            try:
                return future.result(timeout=self._guard.time_left(deadline))
            except concurrent.futures.TimeoutError:
                if future.done():  # the leader's own error, not this wait running out
                    raise
                raise self._guard.expired(
                    f"fetch of artifact {artifact_id!r}",
                    "waiting for the in-flight fetch it shares",
                ) from None
            except _DeadlineExpired:
                # The leader's deadline passed, not necessarily this caller's.
                if deadline is not None and self._clock() >= deadline:
                    raise
                logger.debug("shared fetch of %s hit its leader's deadline; fetching", artifact_id)

    async def fetch_async(
        self, artifact_id: str, *, deadline: float | None = None
    ) -> tuple[bytes, Manifest]:
        """``fetch`` on a worker thread, so an event loop is never blocked by store I/O."""
        return await asyncio.to_thread(self.fetch, artifact_id, deadline=deadline)

    async def fetch_kernel(self, artifact_id: str, *, deadline: float | None = None) -> bytes:
        """The verified payload (the serialized kernel) alone: the specification's
        ``await client.fetch_kernel(kernel_artifact_id)``; ``fetch_async`` also returns the
        manifest, which loading the kernel needs."""
        return (await self.fetch_async(artifact_id, deadline=deadline))[0]

    def verify(self, artifact_id: str) -> Manifest:
        """Fetch and verify one artifact; returns its manifest or raises."""
        return self.fetch(artifact_id)[1]

    def verify_store(self) -> dict[str, str]:
        """Every listed artifact -> ``"ok"`` or the reason it failed verification (one that
        could not be read, an I/O error on its file, fails too: the others are still checked)."""
        report = {}
        for artifact_id in self.list_artifacts():
            try:
                self.verify(artifact_id)
                report[artifact_id] = "ok"
            except (ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError) as exc:
                report[artifact_id] = describe_error(exc, self._guard.secrets)
        return report

    def stats(self) -> dict[str, Any]:
        """Counters (``reads`` counts reads started on a thread; ``read_failures`` includes
        reads that found no free I/O slot in time; ``reads_refused_stalled`` the reads refused
        because every slot was held by a stalled read), plus ``io_threads`` and
        ``stalled_reads``: the ``urza-io`` threads alive now, and how many of them were
        abandoned by their caller."""
        with self._lock:  # the guard's lock too: one snapshot
            stats: dict[str, Any] = dict(self._stats)
            stats.update(self._guard.snapshot_locked())
        stats["breaker_state"] = self.breaker.state
        stats["breaker_opened"] = self.breaker.times_opened
        return stats

    def close(self) -> None:
        """Refuse further store reads and end the fetches under way (``RuntimeError``): no
        further attempt or backoff starts, and their callers stop waiting at once. Each read's
        thread is abandoned and finishes alone (a stalled one within ``timeout_s`` over HTTP)."""
        self._guard.close()

    def __enter__(self) -> UrzaLibraryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _path(self, artifact_id: str, suffix: str) -> str:
        return f"{self._root}/{artifact_id}{suffix}{self._query}"

    def _lead(
        self, artifact_id: str, future: Future[tuple[bytes, Manifest]], deadline: float | None
    ) -> tuple[bytes, Manifest]:
        """Run the fetch that followers of ``artifact_id`` wait on, and hand them its result.

        The fetch leaves the in-flight table before its future completes: a follower woken by
        the completion (one whose leader's deadline passed, fetching anew) must find no
        finished future there to wait on again, or it would spin on it until this thread got
        round to removing it."""
        try:
            result = self._guard.operation(
                f"fetch of artifact {artifact_id!r}",
                deadline,
                lambda budget: self._read_artifact(artifact_id, budget),
            )
        except BaseException as exc:
            self._retire(artifact_id, future)
            future.set_exception(exc)
            raise
        self._retire(artifact_id, future)
        future.set_result(result)
        return result

    def _retire(self, artifact_id: str, future: Future[tuple[bytes, Manifest]]) -> None:
        """Remove ``future`` from the in-flight table, and only it: an entry for the id that
        is not this leader's belongs to a later fetch."""
        with self._lock:
            if self._inflight.get(artifact_id) is future:
                del self._inflight[artifact_id]

    def _read_manifest(self, artifact_id: str, budget: Budget) -> Manifest:
        path = self._path(artifact_id, MANIFEST_SUFFIX)

        def read(cancelled: threading.Event) -> bytes:
            what = f"artifact {artifact_id!r}: manifest"
            return self._read_bounded(
                path, self.max_manifest_bytes, what, "max_manifest_bytes", cancelled
            )

        try:
            raw = self._guard.call(read, budget)
        except FileNotFoundError:
            where = self._guard.url  # without credentials
            raise ArtifactNotFoundError(f"no artifact {artifact_id!r} in {where}") from None
        return verify_manifest(
            raw, self.publishers, expected_id=artifact_id, max_bytes=self.max_manifest_bytes
        )

    def _read_artifact(self, artifact_id: str, budget: Budget) -> tuple[bytes, Manifest]:
        # The manifest is verified (signature first) before a payload byte is read.
        manifest = self._read_manifest(artifact_id, budget)
        if manifest.size > self.max_artifact_bytes:
            raise ArtifactIntegrityError(
                f"artifact {artifact_id!r}: manifest declares {manifest.size} bytes, above "
                f"max_artifact_bytes ({self.max_artifact_bytes}); payload not read"
            )
        path = self._path(artifact_id, PAYLOAD_SUFFIX)

        def read(cancelled: threading.Event) -> tuple[bytes, str]:
            hasher = hashlib.sha256()  # a fresh one per attempt
            what, why = f"artifact {artifact_id!r}: payload", "the size its manifest declares"
            data = self._read_bounded(path, manifest.size, what, why, cancelled, hasher)
            return data, hasher.hexdigest()

        try:
            payload, digest = self._guard.call(read, budget)
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"artifact {artifact_id!r} has a manifest but no payload in {self._guard.url}"
            ) from None
        verify_payload_digest(len(payload), digest, manifest)
        logger.debug("fetched and verified %s (%d bytes)", artifact_id, len(payload))
        return payload, manifest

    def _read_bounded(
        self,
        path: str,
        limit: int,
        what: str,
        why: str,
        cancelled: threading.Event,
        hasher: Any = None,
    ) -> bytes:
        """``read_bounded`` with this client's store, chunk size and open options (an entry
        that is not a readable file is that artifact's ``ArtifactIntegrityError``: not
        retried, a breaker success)."""
        return read_bounded(
            self._fs,
            path,
            limit,
            what=what,
            why=why,
            chunk_bytes=self.chunk_bytes,
            hasher=hasher,
            cancelled=cancelled,
            open_kwargs=self._open_kwargs,
        )


def _trusted(publishers: object) -> TrustedPublishers:
    """The client's verification keys; anything that could sign is refused, not converted."""
    if isinstance(publishers, TrustedPublishers):
        return publishers
    if isinstance(publishers, Mapping):
        return TrustedPublishers(publishers)
    raise TypeError(
        "UrzaLibraryClient verifies artifacts with publisher public keys (TrustedPublishers or "
        f"a mapping of key id -> public key), not {type(publishers).__name__}: an HMAC keyring "
        "or a private key would let the reader sign artifacts too"
    )


def _linked_children(page: str, base: str) -> Iterator[str]:
    """The names of the direct children of ``base`` that ``page`` (an HTML index) links to, in
    one pass: every ``href`` value, resolved against ``base``, without query or fragment,
    percent-decoded."""
    consumed = 0
    for match in _HREF.finditer(page):
        pos = match.end()
        if pos <= consumed or not page[match.start() - 1 : match.start()].isspace():
            continue  # inside the last value, or not an attribute's name
        while pos < len(page) and page[pos].isspace():
            pos += 1
        if pos >= len(page) or page[pos] != "=":
            continue
        pos += 1
        while pos < len(page) and page[pos].isspace():
            pos += 1
        if pos < len(page) and page[pos] in "'\"":
            end = page.find(page[pos], pos + 1)
            end = len(page) if end < 0 else end
            value, consumed = page[pos + 1 : end], end + 1
        else:
            value = _UNQUOTED_VALUE.match(page, pos).group()  # type: ignore[union-attr]
            consumed = pos + len(value)
        link = urllib.parse.urljoin(base, value.strip())
        link = urllib.parse.urldefrag(link)[0].split("?", 1)[0]
        rest = link[len(base) :] if link.startswith(base) else ""
        if rest and "/" not in rest:
            yield urllib.parse.unquote(rest)
