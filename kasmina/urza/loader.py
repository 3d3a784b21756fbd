"""Kernel loading for the manager: cache first, else fetch, verify and deserialise, once.

Why the manager coalesces on top of Urza's own coalescing: concurrent requests for one artifact
must share not only the store read but also the deserialisation and the cache insertion (16
GERMINATEs of one blueprint make one kernel, not 16). The cache keeps that verified original
pristine: every seed trains a deep copy (a few milliseconds, against tens for a cold load), and
the original stays pinned while a live seed uses it.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import logging
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import torch

from kasmina.urza.artifact import validate_artifact_id
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.kernel import GPUKernel
from kasmina.utils.perfstats import LatencyStats
from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = ["KernelLoader"]

# (artifact id, error) of a fetch that already failed for the command being executed: its
# execution must not fetch (and retry, blocking the caller) a second time.
_FAILED: contextvars.ContextVar[tuple[str, BaseException] | None] = contextvars.ContextVar(
    "kasmina_prefetch_failed", default=None
)


class KernelLoader:
    """Loads verified kernels from ``urza_client`` onto ``device`` through ``cache``."""

    def __init__(
        self,
        urza_client: Any,
        cache: GPUKernelCache,
        device: torch.device,
        telemetry: TelemetryReporter,
    ) -> None:
        self.urza_client = urza_client
        self.cache = cache
        self.device = device
        self.telemetry = telemetry
        self.counters: Counter[str] = Counter()
        self.load_latency = LatencyStats()
        self.hit_latency = LatencyStats()
        self._lock = threading.Lock()
        self._loading: dict[str, Future[GPUKernel]] = {}

    def cached(self, artifact_id: str) -> GPUKernel | None:
        """The cached original, or None (a miss); hits are timed."""
        started = time.perf_counter_ns()
        kernel = self.cache.get(artifact_id)
        if kernel is not None:
            self.hit_latency.add_ns(time.perf_counter_ns() - started)
        return kernel  # type: ignore[return-value]

    def original(self, artifact_id: str) -> GPUKernel:
        """The verified original: from the cache, else loaded (concurrent calls share one load).

        Raises ``UrzaUnavailableError``, ``ArtifactNotFoundError`` or ``ArtifactIntegrityError``
        (nothing cached then). Never train the result: ``copy`` it.
        """
        validate_artifact_id(artifact_id)
        kernel = self.cached(artifact_id)
        return kernel if kernel is not None else self._load_coalesced(artifact_id)

    def is_released(self, original: GPUKernel) -> bool:
        """True when ``original`` was evicted (its memory released, or being released)."""
        return original.released or self.cache.was_evicted(original)

    def copy(self, original: GPUKernel) -> GPUKernel:
        """A seed's own trainable copy of a cached original.

        Raises ``ValueError`` when the original was evicted before or *while* it was copied
        (its memory is released after the cache's lock is dropped, so a copy taken meanwhile
        may hold emptied tensors; that copy is released and never returned). Pin the original
        first (``pin``) and it cannot be evicted.
        """
        if self.is_released(original):
            raise ValueError(
                f"kernel {original.artifact_id!r} was evicted from the cache and released; "
                "load it again"
            )
        with warnings.catch_warnings():
            # torch's own pytree specs warn about their own deprecated class when copied.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            duplicate = copy.deepcopy(original)
        if self.is_released(original) or duplicate.released:
            duplicate.release_gpu_memory()
            raise ValueError(
                f"kernel {original.artifact_id!r} was evicted from the cache while it was "
                "copied; load it again"
            )
        return duplicate

    def pin(self, artifact_id: str, original: GPUKernel | None = None) -> bool:
        """Pin the cached original for a live seed; False if it is not (or no longer) cached.

        With ``original``, only that very kernel is pinned: if the cache holds another one
        under the id (``original`` was evicted and the artifact loaded again), nothing stays
        pinned and the answer is False.
        """
        try:
            pinned = self.cache.pin(artifact_id)
        except KeyError:
            return False
        if original is not None and pinned is not original:
            self.cache.unpin(artifact_id)
            return False
        return True

    @contextlib.contextmanager
    def failed_fetch(self, artifact_id: str, error: BaseException | None) -> Iterator[None]:
        """Within this block, loading ``artifact_id`` re-raises ``error`` at once (if set)."""
        token = _FAILED.set((artifact_id, error)) if error is not None else None
        try:
            yield
        finally:
            if token is not None:
                _FAILED.reset(token)

    def _load_coalesced(self, artifact_id: str) -> GPUKernel:
        failed = _FAILED.get()
        if failed is not None and failed[0] == artifact_id:
            raise failed[1]
        with self._lock:
            if artifact_id in self.cache:  # loaded meanwhile by another caller
                kernel = self.cached(artifact_id)
                if kernel is not None:
                    return kernel
            future = self._loading.get(artifact_id)
            leader = future is None
            if leader:
                future = self._loading[artifact_id] = Future()
        assert future is not None
        if not leader:
            self.counters["loads_coalesced"] += 1
            return future.result()
        try:
            kernel = self._fetch(artifact_id)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(kernel)
            return kernel
        finally:
            with self._lock:
                del self._loading[artifact_id]

    def _fetch(self, artifact_id: str) -> GPUKernel:
        started = time.perf_counter_ns()
        try:
            payload, manifest = self.urza_client.fetch(artifact_id)
            kernel = GPUKernel.from_binary(payload, manifest, self.device)
        except Exception as exc:
            self.counters["load_failures"] += 1
            labels = {"artifact_id": artifact_id, "error": type(exc).__name__}
            self.telemetry.emit("kernel.load_failed", 1.0, labels=labels)
            logger.error("could not load kernel %s: %s: %s", artifact_id, type(exc).__name__, exc)
            raise
        cached = self.cache.put(artifact_id, kernel)
        elapsed = time.perf_counter_ns() - started
        self.load_latency.add_ns(elapsed)
        self.counters["loads"] += 1
        labels = {"artifact_id": artifact_id, "cached": str(cached).lower()}
        self.telemetry.emit("kernel.load_ms", elapsed / 1e6, labels=labels)
        logger.info("loaded kernel %s in %.1f ms", artifact_id, elapsed / 1e6)
        return kernel
