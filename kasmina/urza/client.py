"""Urza: the artifact store seeds' kernels are loaded from (docs/design.md §6).

A store is any fsspec URL (a local directory by default; ``memory://``, ``http://``, object
stores work the same way) holding two files per artifact, side by side::

    <artifact_id>.pt2            the torch.export program (payload)
    <artifact_id>.manifest.json  its signed manifest (kasmina.urza.artifact.Manifest)

The manifest is written last (``kasmina.urza.publish``), so an artifact is listed only once it is
complete.
``UrzaLibraryClient.fetch`` returns payload bytes only after the manifest's Ed25519 signature
(checked against the client's ``TrustedPublishers``: public keys only, so a trainer holds nothing
that could sign an artifact), size and SHA-256 verify; it never deserialises anything
(``GPUKernel.from_binary`` does, after checking again). Reads are bounded and streamed: a
manifest above ``max_manifest_bytes``, or a payload longer than its manifest declares (or above
``max_artifact_bytes``), is refused after at most the limit plus one chunk, and the payload is
hashed as it streams. Every store read has a timeout (an abandoned read stops at its next
chunk), failed reads are retried with exponential backoff, a circuit breaker (one success or one
failure per fetch, manifest and payload together) stops hammering a store that keeps failing,
and concurrent fetches of one artifact share a single read.

A fetch may carry a deadline (a ``time.monotonic()`` instant): the whole fetch, every read,
retry and backoff sleep included, ends by it. Reads run on ``urza-io`` threads, and a client
never has more than ``max_stalled_reads`` of them alive, abandoned ones included: a store that
hangs in a blocking call (a FIFO, a stalled HTTP server) cannot make the thread count grow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from kasmina.errors import ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError
from kasmina.urza.artifact import (
    MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES,
    PAYLOAD_SUFFIX,
    READ_CHUNK_BYTES,
    Manifest,
    open_store,
    read_bounded,
    validate_artifact_id,
    verify_manifest,
    verify_payload_digest,
)
from kasmina.urza.keys import TrustedPublishers

logger = logging.getLogger(__name__)

__all__ = ["CircuitBreaker", "UrzaLibraryClient"]

T = TypeVar("T")
# Default payload ceiling: a kernel is a small module, so this is generous.
MAX_ARTIFACT_BYTES = 1 << 30
# Default cap on a client's live I/O threads (abandoned reads still blocked included).
MAX_STALLED_READS = 4


class _DeadlineExpired(UrzaUnavailableError):
    """An operation's deadline passed before it finished.

    Callers see an ``UrzaUnavailableError``; the subclass only lets a coalesced follower tell
    that its leader ran out of *its own* time (so a follower with time left fetches anew,
    instead of inheriting a failure that says nothing about the store)."""


@dataclass
class _Budget:
    """What one operation (a fetch, a manifest read, a listing) may spend, and what it saw.

    ``failed`` and ``answered`` count its reads that failed (transport error, timeout) and
    that the store answered (data, "missing", "refused"): they decide how a deadline expiry
    counts for the breaker (``UrzaLibraryClient._breaker_op``)."""

    what: str
    attempts: int
    deadline: float | None
    failed: int = 0
    answered: int = 0


@dataclass
class _Read:
    """One read on an ``urza-io`` thread; ``abandoned`` once its caller stopped waiting."""

    abandoned: bool = False


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``reset_s`` one trial call is let
    through (half-open): success closes it, failure opens it again for another ``reset_s``.

    ``UrzaLibraryClient`` reports one outcome per operation (a fetch: manifest and payload
    together), never per read attempt, and none for an operation whose deadline had passed
    before its first read (a trial that never reports back is replaced after ``reset_s``)."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(
        self, threshold: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if threshold < 1:
            raise ValueError(f"breaker threshold must be >= 1, got {threshold}")
        if reset_s < 0:
            raise ValueError(f"breaker reset_s must be >= 0, got {reset_s}")
        self.threshold = threshold
        self.reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = self.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self.times_opened = 0

    @property
    def state(self) -> str:
        return self._state

    def allow(self) -> bool:
        with self._lock:
            if self._state == self.CLOSED:
                return True
            # Open long enough, or a half-open trial that never reported back (interrupted):
            # this caller becomes the single trial.
            if self._clock() - self._opened_at >= self.reset_s:
                self._state = self.HALF_OPEN
                self._opened_at = self._clock()
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            if self._state != self.CLOSED:
                logger.info("Urza circuit breaker closed")
            self._state = self.CLOSED
            self._failures = 0

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._state == self.HALF_OPEN or (
                self._state == self.CLOSED and self._failures >= self.threshold
            ):
                self._state = self.OPEN
                self._opened_at = self._clock()
                self.times_opened += 1
                logger.warning("Urza circuit breaker opened after %d failures", self._failures)


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
    For the breaker, an expiry is a failure when one of the operation's reads failed or timed
    out (the store did not answer in time); when every read it made was answered it is a
    success; and when it expired before its first read it is no outcome at all, since the
    store was never asked. A caller whose deadlines are shorter than the store's usual latency
    therefore opens the breaker: from where it stands the store is unavailable, and the open
    breaker stops it from starting reads that cannot finish in time.

    **Threads.** Reads run on ``urza-io`` daemon threads, since a blocking syscall cannot be
    interrupted; a read that overruns is abandoned, not killed. At most ``max_stalled_reads``
    such threads are alive at once, abandoned ones still blocked included. A read that finds
    every slot held by an abandoned read is refused at once, without starting a thread (an
    ``UrzaUnavailableError``, counted in ``stats()["reads_refused_stalled"]``, and a breaker
    failure: those reads are the store still hanging). A read that finds slots held by live
    reads waits for one within its own timeout, so healthy concurrent fetches of different
    artifacts are queued, not refused, and the thread count stays bounded either way.
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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 0 or backoff_s < 0 or backoff_max_s < 0:
            raise ValueError("retries, backoff_s and backoff_max_s must be >= 0")
        for name, value in (
            ("max_manifest_bytes", max_manifest_bytes),
            ("max_artifact_bytes", max_artifact_bytes),
            ("chunk_bytes", chunk_bytes),
            ("max_stalled_reads", max_stalled_reads),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.url = url
        self.publishers = _trusted(publishers)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.max_manifest_bytes = max_manifest_bytes
        self.max_artifact_bytes = max_artifact_bytes
        self.chunk_bytes = chunk_bytes
        self.max_stalled_reads = max_stalled_reads
        self.breaker = CircuitBreaker(breaker_threshold, breaker_reset_s, clock)
        self._clock = clock
        self._sleep = sleep
        self._closed = False
        options = dict(storage_options or {})
        if url.startswith(("http://", "https://")) and "client_kwargs" not in options:
            import aiohttp  # fsspec's HTTP backend depends on it

            options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=self.timeout_s)}
        self._fs, self._root = open_store(url, options)
        # Elsewhere, the file's own read-ahead is one chunk at most. HTTP: one streaming GET
        # (block_size=0), which also works against servers that ignore Range. Passing a size
        # skips fsspec's HEAD probe (the streaming file ignores it), which would report any
        # failure, even a refused connection, as FileNotFoundError: the GET maps only a 404.
        self._open_kwargs: dict[str, Any] = {"block_size": chunk_bytes}
        if _is_http(self._fs):
            self._open_kwargs = {"block_size": 0, "size": 1}
        self._lock = threading.Lock()
        # Guards the I/O thread counts below (same lock as the stats and the in-flight map).
        self._io_changed = threading.Condition(self._lock)
        self._io_alive = 0  # urza-io threads not yet finished
        self._io_stalled = 0  # of which abandoned by their caller
        self._inflight: dict[str, Future[tuple[bytes, Manifest]]] = {}
        self._stats = {
            "fetches": 0,
            "coalesced": 0,
            "reads": 0,
            "read_failures": 0,
            "reads_abandoned": 0,
            "reads_refused_stalled": 0,
            "deadlines_expired": 0,
        }

    @classmethod
    def from_config(
        cls, config: Any, publishers: TrustedPublishers | None = None
    ) -> UrzaLibraryClient:
        """From a ``KasminaConfig``; the trusted publishers default to
        ``config.load_trusted_publishers()`` (``urza_trusted_publishers`` and
        ``urza_publishers_file``)."""
        return cls(
            config.urza_url,
            publishers if publishers is not None else config.load_trusted_publishers(),
            timeout_s=config.urza_timeout_s,
            retries=config.urza_retries,
            backoff_s=config.urza_backoff_s,
            backoff_max_s=config.urza_backoff_max_s,
            breaker_threshold=config.urza_breaker_threshold,
            breaker_reset_s=config.urza_breaker_reset_s,
        )

    # --- public API ---------------------------------------------------------------------

    def list_artifacts(self) -> list[str]:
        """Ids of the artifacts whose manifest is in the store (unverified), sorted."""
        try:
            entries = self._breaker_op(
                "listing",
                None,
                lambda budget: self._call(
                    lambda cancelled: self._fs.ls(self._root, detail=False), budget
                ),
            )
        except FileNotFoundError:
            return []
        ids = []
        for entry in entries:
            name = str(entry).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(MANIFEST_SUFFIX):
                artifact_id = name[: -len(MANIFEST_SUFFIX)]
                try:
                    ids.append(validate_artifact_id(artifact_id))
                except ValueError:
                    logger.warning("ignoring store entry with an invalid artifact id: %r", name)
        return sorted(ids)

    def get_manifest(self, artifact_id: str, *, deadline: float | None = None) -> Manifest:
        """The artifact's verified manifest (signature checked; payload not read).

        ``deadline`` bounds the read and its retries as for ``fetch``."""
        validate_artifact_id(artifact_id)
        return self._breaker_op(
            f"manifest read of artifact {artifact_id!r}",
            deadline,
            lambda budget: self._read_manifest(artifact_id, budget),
        )

    def fetch(self, artifact_id: str, *, deadline: float | None = None) -> tuple[bytes, Manifest]:
        """Payload bytes and manifest, both verified. Concurrent calls for one id share a read.

        With ``deadline`` (an instant of the client's clock, ``time.monotonic`` by default) the
        call returns or raises by then, however long the shared read takes: a follower stops
        waiting at its own deadline and the leader's fetch goes on for the others. A follower
        whose leader ran out of the leader's own time fetches anew if it has time left.
        """
        validate_artifact_id(artifact_id)
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
                return future.result(timeout=self._time_left(deadline))
            except concurrent.futures.TimeoutError:
                if future.done():  # the leader's own error, not this wait running out
                    raise
                raise self._expired(
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

    def verify(self, artifact_id: str) -> Manifest:
        """Fetch and verify one artifact; returns its manifest or raises."""
        return self.fetch(artifact_id)[1]

    def verify_store(self) -> dict[str, str]:
        """Every listed artifact -> ``"ok"`` or the reason it failed verification."""
        report = {}
        for artifact_id in self.list_artifacts():
            try:
                self.verify(artifact_id)
                report[artifact_id] = "ok"
            except (ArtifactIntegrityError, ArtifactNotFoundError) as exc:
                report[artifact_id] = f"{type(exc).__name__}: {exc}"
        return report

    def stats(self) -> dict[str, Any]:
        """Counters (``reads`` counts reads started on a thread; ``read_failures`` includes
        reads that found no free I/O slot in time; ``reads_refused_stalled`` the reads refused
        because every slot was held by a stalled read), plus ``io_threads`` and
        ``stalled_reads``: the ``urza-io`` threads alive now, and how many of them were
        abandoned by their caller."""
        with self._lock:
            stats: dict[str, Any] = dict(self._stats)
            stats["io_threads"] = self._io_alive
            stats["stalled_reads"] = self._io_stalled
        stats["breaker_state"] = self.breaker.state
        stats["breaker_opened"] = self.breaker.times_opened
        return stats

    def close(self) -> None:
        """Refuse further store reads (reads already abandoned to a timeout finish alone)."""
        self._closed = True

    def __enter__(self) -> UrzaLibraryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ----------------------------------------------------------------------

    def _path(self, artifact_id: str, suffix: str) -> str:
        return f"{self._root}/{artifact_id}{suffix}"

    def _lead(
        self, artifact_id: str, future: Future[tuple[bytes, Manifest]], deadline: float | None
    ) -> tuple[bytes, Manifest]:
        """Run the fetch that followers of ``artifact_id`` wait on, and hand them its result."""
        try:
            result = self._breaker_op(
                f"fetch of artifact {artifact_id!r}",
                deadline,
                lambda budget: self._read_artifact(artifact_id, budget),
            )
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                del self._inflight[artifact_id]

    def _time_left(self, deadline: float | None) -> float | None:
        """Seconds until ``deadline`` (never negative), or None without one."""
        return None if deadline is None else max(0.0, deadline - self._clock())

    def _expired(self, what: str, detail: str) -> _DeadlineExpired:
        with self._lock:
            self._stats["deadlines_expired"] += 1
        return _DeadlineExpired(
            f"Urza {what} at {self.url} did not finish within its deadline ({detail})"
        )

    def _read_manifest(self, artifact_id: str, budget: _Budget) -> Manifest:
        path = self._path(artifact_id, MANIFEST_SUFFIX)

        def read(cancelled: threading.Event) -> bytes:
            what = f"artifact {artifact_id!r}: manifest"
            return self._read_bounded(
                path, self.max_manifest_bytes, what, "max_manifest_bytes", cancelled
            )

        try:
            raw = self._call(read, budget)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no artifact {artifact_id!r} in {self.url}") from None
        return verify_manifest(
            raw, self.publishers, expected_id=artifact_id, max_bytes=self.max_manifest_bytes
        )

    def _read_artifact(self, artifact_id: str, budget: _Budget) -> tuple[bytes, Manifest]:
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
            payload, digest = self._call(read, budget)
        except FileNotFoundError:
            raise ArtifactNotFoundError(
                f"artifact {artifact_id!r} has a manifest but no payload in {self.url}"
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
        """``read_bounded`` with this client's store, chunk size and open options."""
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

    def _breaker_op(self, what: str, deadline: float | None, op: Callable[[_Budget], T]) -> T:
        """One operation (a fetch, a manifest read, a listing) as one breaker outcome.

        ``op`` gets its ``_Budget``: ``retries + 1`` attempts per read, or 1 for the half-open
        trial, and the deadline. The store answering, even "missing" or "corrupt", is a
        success; a read that stayed unavailable after its attempts is a failure. A deadline
        expiry is a failure if a read failed or timed out, a success if every read was
        answered, and no outcome if no read was made: a deadline that had passed before the
        first read is checked before the breaker is asked, so it cannot use up the half-open
        trial.
        """
        if self._closed:
            raise RuntimeError(f"UrzaLibraryClient for {self.url} is closed")
        if deadline is not None and self._clock() >= deadline:
            raise self._expired(what, "it had passed before the first read; nothing was read")
        if not self.breaker.allow():
            raise UrzaUnavailableError(f"Urza circuit breaker is open for {self.url}; not trying")
        trial = self.breaker.state == CircuitBreaker.HALF_OPEN
        budget = _Budget(what, 1 if trial else self.retries + 1, deadline)
        try:
            result = op(budget)
        except _DeadlineExpired:
            if budget.failed:
                self.breaker.record_failure()
            elif budget.answered:
                self.breaker.record_success()
            raise
        except UrzaUnavailableError:
            self.breaker.record_failure()
            raise
        except (FileNotFoundError, ArtifactNotFoundError, ArtifactIntegrityError):
            self.breaker.record_success()
            raise
        self.breaker.record_success()
        return result

    def _call(self, op: Callable[[threading.Event], T], budget: _Budget) -> T:
        """One store read with a timeout, retried with backoff up to ``budget.attempts`` times.

        ``op`` gets an event that is set when its read is abandoned (timed out): a streaming
        read checks it per chunk and stops. A missing file (``FileNotFoundError``) or a refused
        object (``ArtifactIntegrityError``) is an answer and is re-raised at once; so is a read
        refused because every I/O slot is held by a stalled read (retrying would only wait on
        the same stalled reads). Anything else is a transport failure, and the last one is
        raised as ``UrzaUnavailableError``. Retrying stops early once the breaker is open
        (another operation opened it), and at the deadline: each attempt waits at most the time
        left, and a backoff sleep that would reach the deadline is not slept.
        """
        if self._closed:
            raise RuntimeError(f"UrzaLibraryClient for {self.url} is closed")
        deadline = budget.deadline
        last: BaseException | None = None
        for attempt in range(budget.attempts):
            if attempt and self.breaker.state == CircuitBreaker.OPEN:
                raise UrzaUnavailableError(
                    f"Urza circuit breaker opened for {self.url}; not retrying"
                ) from last
            timeout = self.timeout_s
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0:
                    detail = f"last error: {last!r}" if last else "no time left for the next read"
                    raise self._expired(budget.what, detail) from last
                timeout = min(timeout, left)
            try:
                result = self._run_read(op, timeout)
            except (FileNotFoundError, ArtifactIntegrityError):
                budget.answered += 1
                raise
            except UrzaUnavailableError:
                raise
            except Exception as exc:  # any transport failure: timeout, connection, HTTP 5xx
                budget.failed += 1
                with self._lock:
                    self._stats["read_failures"] += 1
                last = exc
                logger.warning(
                    "Urza read failed (attempt %d/%d): %s: %s",
                    attempt + 1,
                    budget.attempts,
                    type(exc).__name__,
                    exc,
                )
                if attempt + 1 < budget.attempts:
                    delay = min(self.backoff_max_s, self.backoff_s * 2**attempt)
                    if deadline is not None and self._clock() + delay >= deadline:
                        raise self._expired(
                            budget.what,
                            f"no time left to retry after {delay:.3g} s of backoff; "
                            f"last error: {exc!r}",
                        ) from exc
                    self._sleep(delay)
                elif deadline is not None and self._clock() >= deadline:
                    raise self._expired(budget.what, f"last error: {exc!r}") from exc
            else:
                budget.answered += 1
                return result
        plural = "s" if budget.attempts != 1 else ""
        raise UrzaUnavailableError(
            f"Urza at {self.url} unavailable after {budget.attempts} attempt{plural}: {last!r}"
        ) from last

    def _run_read(self, op: Callable[[threading.Event], T], timeout_s: float) -> T:
        """Run ``op(cancelled)`` on an ``urza-io`` daemon thread and wait at most ``timeout_s``
        (a wait for a free I/O slot included) for it.

        A read that overruns is abandoned, not killed (Python cannot kill a thread):
        ``cancelled`` is set, so a chunked read stops at its next chunk and drops what it read,
        but a read blocked inside one syscall (opening a FIFO, a server that stopped sending)
        stays blocked, and its thread stays alive, until that call returns. Such threads keep
        their slot, so they are capped: with every slot held by an abandoned read a new one is
        refused at once, without a thread; with slots held by live reads it waits for one.
        """
        started = time.monotonic()  # real time: this bounds real waits, whatever the clock
        read = _Read()
        with self._io_changed:
            while self._io_alive >= self.max_stalled_reads:
                if self._io_stalled >= self.max_stalled_reads:
                    self._stats["reads_refused_stalled"] += 1
                    raise UrzaUnavailableError(
                        f"Urza at {self.url}: {self._io_stalled} abandoned reads are still "
                        f"blocked (max_stalled_reads={self.max_stalled_reads}); read refused "
                        "without starting a thread"
                    )
                left = timeout_s - (time.monotonic() - started)
                if left <= 0:
                    raise TimeoutError(
                        f"no free Urza I/O slot within {timeout_s:.3g} s "
                        f"({self._io_alive} reads in progress)"
                    )
                self._io_changed.wait(left)
            self._io_alive += 1
            self._stats["reads"] += 1
        future: Future[T] = Future()
        cancelled = threading.Event()

        def run() -> None:
            try:
                if cancelled.is_set():  # abandoned before it began: do not even open the file
                    raise TimeoutError("Urza read abandoned before it started")
                future.set_result(op(cancelled))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._io_changed:
                    self._io_alive -= 1
                    if read.abandoned:
                        self._io_stalled -= 1
                    self._io_changed.notify_all()

        try:
            threading.Thread(target=run, name="urza-io", daemon=True).start()
        except BaseException:
            with self._io_changed:
                self._io_alive -= 1
                self._io_changed.notify_all()
            raise
        try:
            return future.result(timeout=max(0.0, timeout_s - (time.monotonic() - started)))
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"Urza read did not finish within {timeout_s:.3g} s") from None
        finally:
            cancelled.set()  # a no-op once the read is done; otherwise it is abandoned
            with self._io_changed:
                if not future.done():  # still running: its thread keeps its slot
                    read.abandoned = True
                    self._io_stalled += 1
                    self._stats["reads_abandoned"] += 1
                    self._io_changed.notify_all()


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


def _is_http(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return bool({"http", "https"} & set(protocols))
