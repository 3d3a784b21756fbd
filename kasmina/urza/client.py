"""Urza: the artifact store seeds' kernels are loaded from (docs/design.md §6).

A store is any fsspec URL (a local directory by default; ``memory://``, ``http://``, object
stores work the same way) holding two files per artifact, side by side::

    <artifact_id>.pt2            the torch.export program (payload)
    <artifact_id>.manifest.json  its signed manifest (kasmina.urza.artifact.Manifest)

The manifest is written last (``kasmina.urza.publish``), so an artifact is listed only once it is
complete.
``UrzaLibraryClient.fetch`` returns payload bytes only after the manifest signature, size and
SHA-256 verify; it never deserialises anything (``GPUKernel.from_binary`` does, after checking
again). Reads are bounded and streamed: a manifest above ``max_manifest_bytes``, or a payload
longer than its manifest declares (or above ``max_artifact_bytes``), is refused after at most the
limit plus one chunk, and the payload is hashed as it streams. Every store read has a timeout
(an abandoned read stops at its next chunk), failed reads are retried with exponential backoff,
a circuit breaker (one success or one failure per fetch, manifest and payload together) stops
hammering a store that keeps failing, and concurrent fetches of one artifact share a single read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
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
from kasmina.utils.keyring import Keyring

logger = logging.getLogger(__name__)

__all__ = ["CircuitBreaker", "UrzaLibraryClient"]

T = TypeVar("T")
# Default payload ceiling: a kernel is a small module, so this is generous.
MAX_ARTIFACT_BYTES = 1 << 30


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``reset_s`` one trial call is let
    through (half-open): success closes it, failure opens it again for another ``reset_s``.

    ``UrzaLibraryClient`` reports one outcome per operation (a fetch: manifest and payload
    together), never per read attempt."""

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
    """Reads and verifies artifacts from one store (see the module docstring)."""

    def __init__(
        self,
        url: str,
        keyring: Keyring,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        backoff_max_s: float = 2.0,
        breaker_threshold: int = 5,
        breaker_reset_s: float = 30.0,
        trusted_key_ids: Sequence[str] = (),
        max_manifest_bytes: int = MAX_MANIFEST_BYTES,
        max_artifact_bytes: int = MAX_ARTIFACT_BYTES,
        chunk_bytes: int = READ_CHUNK_BYTES,
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
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.url = url
        self.keyring = keyring
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.backoff_max_s = float(backoff_max_s)
        self.trusted_key_ids = tuple(trusted_key_ids)
        self.max_manifest_bytes = max_manifest_bytes
        self.max_artifact_bytes = max_artifact_bytes
        self.chunk_bytes = chunk_bytes
        self.breaker = CircuitBreaker(breaker_threshold, breaker_reset_s, clock)
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
        self._inflight: dict[str, Future[tuple[bytes, Manifest]]] = {}
        self._stats = {"fetches": 0, "coalesced": 0, "reads": 0, "read_failures": 0}

    @classmethod
    def from_config(cls, config: Any, keyring: Keyring | None = None) -> UrzaLibraryClient:
        """From a ``KasminaConfig``; the keyring defaults to ``config.load_keyring()``."""
        return cls(
            config.urza_url,
            keyring if keyring is not None else config.load_keyring(),
            timeout_s=config.urza_timeout_s,
            retries=config.urza_retries,
            backoff_s=config.urza_backoff_s,
            backoff_max_s=config.urza_backoff_max_s,
            breaker_threshold=config.urza_breaker_threshold,
            breaker_reset_s=config.urza_breaker_reset_s,
            trusted_key_ids=config.urza_trusted_key_ids,
        )

    # --- public API ---------------------------------------------------------------------

    def list_artifacts(self) -> list[str]:
        """Ids of the artifacts whose manifest is in the store (unverified), sorted."""
        try:
            entries = self._breaker_op(
                lambda attempts: self._call(
                    lambda cancelled: self._fs.ls(self._root, detail=False), attempts
                )
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

    def get_manifest(self, artifact_id: str) -> Manifest:
        """The artifact's verified manifest (signature checked; payload not read)."""
        validate_artifact_id(artifact_id)
        return self._breaker_op(lambda attempts: self._read_manifest(artifact_id, attempts))

    def fetch(self, artifact_id: str) -> tuple[bytes, Manifest]:
        """Payload bytes and manifest, both verified. Concurrent calls for one id share a read."""
        validate_artifact_id(artifact_id)
        with self._lock:
            future = self._inflight.get(artifact_id)
            leader = future is None
            if leader:
                future = self._inflight[artifact_id] = Future()
                self._stats["fetches"] += 1
            else:
                self._stats["coalesced"] += 1
        if not leader:
            return future.result()
        try:
            result = self._fetch_now(artifact_id)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(result)
            return result
        finally:
            with self._lock:
                del self._inflight[artifact_id]

    async def fetch_async(self, artifact_id: str) -> tuple[bytes, Manifest]:
        """``fetch`` on a worker thread, so an event loop is never blocked by store I/O."""
        return await asyncio.to_thread(self.fetch, artifact_id)

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
        with self._lock:
            stats: dict[str, Any] = dict(self._stats)
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

    def _fetch_now(self, artifact_id: str) -> tuple[bytes, Manifest]:
        return self._breaker_op(lambda attempts: self._read_artifact(artifact_id, attempts))

    def _read_manifest(self, artifact_id: str, attempts: int) -> Manifest:
        path = self._path(artifact_id, MANIFEST_SUFFIX)

        def read(cancelled: threading.Event) -> bytes:
            what = f"artifact {artifact_id!r}: manifest"
            return self._read_bounded(
                path, self.max_manifest_bytes, what, "max_manifest_bytes", cancelled
            )

        try:
            raw = self._call(read, attempts)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"no artifact {artifact_id!r} in {self.url}") from None
        return verify_manifest(
            raw,
            self.keyring,
            expected_id=artifact_id,
            trusted_key_ids=self.trusted_key_ids,
            max_bytes=self.max_manifest_bytes,
        )

    def _read_artifact(self, artifact_id: str, attempts: int) -> tuple[bytes, Manifest]:
        # The manifest is verified (signature first) before a payload byte is read.
        manifest = self._read_manifest(artifact_id, attempts)
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
            payload, digest = self._call(read, attempts)
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

    def _breaker_op(self, op: Callable[[int], T]) -> T:
        """One operation (a fetch, a manifest read, a listing) as one breaker outcome.

        ``op`` gets the number of attempts each of its reads may make: ``retries + 1``, or 1
        for the half-open trial. The store answering, even "missing" or "corrupt", is a
        success; only a read that stayed unavailable after its attempts is a failure.
        """
        if self._closed:
            raise RuntimeError(f"UrzaLibraryClient for {self.url} is closed")
        if not self.breaker.allow():
            raise UrzaUnavailableError(f"Urza circuit breaker is open for {self.url}; not trying")
        trial = self.breaker.state == CircuitBreaker.HALF_OPEN
        try:
            result = op(1 if trial else self.retries + 1)
        except UrzaUnavailableError:
            self.breaker.record_failure()
            raise
        except (FileNotFoundError, ArtifactNotFoundError, ArtifactIntegrityError):
            self.breaker.record_success()
            raise
        self.breaker.record_success()
        return result

    def _call(self, op: Callable[[threading.Event], T], attempts: int) -> T:
        """One store read with a timeout, retried with backoff up to ``attempts`` times.

        ``op`` gets an event that is set when its read is abandoned (timed out): a streaming
        read checks it per chunk and stops. A missing file (``FileNotFoundError``) or a refused
        object (``ArtifactIntegrityError``) is an answer and is re-raised at once; anything
        else is a transport failure, and the last one is raised as ``UrzaUnavailableError``.
        Retrying stops early once the breaker is open (another operation opened it).
        """
        if self._closed:
            raise RuntimeError(f"UrzaLibraryClient for {self.url} is closed")
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt and self.breaker.state == CircuitBreaker.OPEN:
                raise UrzaUnavailableError(
                    f"Urza circuit breaker opened for {self.url}; not retrying"
                ) from last
            with self._lock:
                self._stats["reads"] += 1
            try:
                return _call_with_timeout(self.timeout_s, op)
            except (FileNotFoundError, ArtifactIntegrityError):
                raise
            except Exception as exc:  # any transport failure: timeout, connection, HTTP 5xx
                with self._lock:
                    self._stats["read_failures"] += 1
                last = exc
                logger.warning(
                    "Urza read failed (attempt %d/%d): %s: %s",
                    attempt + 1,
                    attempts,
                    type(exc).__name__,
                    exc,
                )
                if attempt + 1 < attempts:
                    self._sleep(min(self.backoff_max_s, self.backoff_s * 2**attempt))
        plural = "s" if attempts != 1 else ""
        raise UrzaUnavailableError(
            f"Urza at {self.url} unavailable after {attempts} attempt{plural}: {last!r}"
        ) from last


def _is_http(fs: Any) -> bool:
    protocol = getattr(fs, "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return bool({"http", "https"} & set(protocols))


def _call_with_timeout(timeout_s: float, op: Callable[[threading.Event], T]) -> T:
    """Run ``op(cancelled)`` on a daemon thread and wait at most ``timeout_s`` for it.

    A read that overruns is abandoned, not killed (Python cannot kill a thread): ``cancelled``
    is set, so a chunked read stops at its next chunk and drops what it read; being a daemon
    the thread never holds up interpreter exit, and the circuit breaker stops new reads from
    piling up behind a store that keeps hanging.
    """
    future: Future[T] = Future()
    cancelled = threading.Event()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(op(cancelled))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="urza-io", daemon=True).start()
    try:
        return future.result(timeout=timeout_s)
    finally:
        cancelled.set()  # a no-op once the read is done; otherwise it is abandoned
