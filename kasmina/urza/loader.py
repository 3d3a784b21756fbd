"""Kernel loading for the manager: cache first, else fetch, verify and deserialise, once.

Why the manager coalesces on top of Urza's own coalescing: concurrent requests for one artifact
must share not only the store read but also the deserialisation and the cache insertion (16
GERMINATEs of one blueprint make one kernel, not 16). The cache keeps that verified original
pristine: every seed trains a deep copy (a few milliseconds, against tens for a cold load), and
the original stays pinned while a live seed uses it.

A load may carry a deadline (a ``time.monotonic()`` instant) so that a training step is never
held up by a slow store: the store fetch ends by it, and a caller waiting on another's load
stops waiting at it while that load goes on for the others. Deserialising a kernel already
fetched (tens of milliseconds) is not interrupted.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from kasmina.errors import UrzaUnavailableError
from kasmina.urza.artifact import validate_artifact_id
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.resilience import _Closed, _DeadlineExpired, check_deadline
from kasmina.utils.checks import check_int
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.locks import fork_safe, whole_at_fork
from kasmina.utils.perfstats import LatencyStats
from kasmina.utils.ratelimit import rarely
from kasmina.utils.telemetry import TelemetryReporter

logger = logging.getLogger(__name__)

__all__ = ["KernelLoader"]


class KernelLoader:
    """Loads verified kernels from ``urza_client`` onto ``device`` through ``cache``.

    ``urza_client`` is an ``UrzaLibraryClient`` or anything with its ``fetch``. A deadline is
    passed on as ``fetch(artifact_id, deadline=...)`` only when there is one, so a client
    whose ``fetch`` takes no deadline keeps working for loads without one.
    """

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
        self._counters: Counter[str] = Counter()  # ``counters``
        self.load_latency = LatencyStats()
        self.hit_latency = LatencyStats()
        self._lock = threading.Lock()
        self._loading: dict[str, Future[GPUKernel]] = {}
        fork_safe(self)  # ``_at_fork_reinit``

    @property
    def counters(self) -> Counter[str]:
        """``loads``, ``load_failures``, ``loads_coalesced``, ``load_deadlines_expired`` and
        ``evicted_before_pin``, as a copy (0 for a key never counted): a fetch worker counting a
        new key while an exporter walked the live ``Counter`` raised "dictionary changed size
        during iteration"."""
        return self._counters.copy()

    def _at_fork_reinit(self) -> None:
        """After ``fork()``, in the child: the loads in flight were other threads', gone there,
        and never end (a load of the same kernel waited on one for good, without a deadline):
        they are forgotten, and the lock they were taken under is made free."""
        self._lock._at_fork_reinit()
        self._loading.clear()

    def cached(self, artifact_id: str) -> GPUKernel | None:
        """The cached original, or None (a miss); hits are timed."""
        started = time.perf_counter_ns()
        kernel = self.cache.get(artifact_id)
        if kernel is not None:
            self.hit_latency.add_ns(time.perf_counter_ns() - started)
        return kernel  # type: ignore[return-value]

    def original(self, artifact_id: str, *, deadline: float | None = None) -> GPUKernel:
        """The verified original: from the cache, else loaded (concurrent calls share one load).

        ``deadline`` (a ``time.monotonic()`` instant) bounds the wait: the store fetch gets it,
        and a call that joined another's load stops waiting at its own deadline (that load
        goes on, and caches the kernel for the next call). Raises ``UrzaUnavailableError``
        (also when the deadline passes), ``ArtifactNotFoundError`` or
        ``ArtifactIntegrityError`` (nothing cached then). Never train the result: ``copy`` it.
        """
        validate_artifact_id(artifact_id)
        kernel = self.cached(artifact_id)
        return kernel if kernel is not None else self._load_coalesced(artifact_id, deadline)

    def pinned_original(
        self,
        artifact_id: str,
        *,
        deadline: float | None = None,
        attempts: int = 3,
        hold: Callable[[], None] | None = None,
    ) -> tuple[GPUKernel, bool]:
        """``original``, pinned before anyone copies it: ``(kernel, pinned)``. Another load's
        put may evict the kernel between its load and the pin; it is then loaded again (the
        same ``deadline``), up to ``attempts`` loads in all. A kernel the cache does not hold
        (served uncached) comes back unpinned, as nothing can release it; one evicted on every
        attempt comes back unpinned too, and ``copy`` refuses it. ``hold``: records the pin
        for its owner (a queued command, on a fetch worker), called once it is taken, in one
        section with it that a ``fork()``ed child sees whole (``whole_at_fork``); the pin is
        ``hold``'s from its call on. ``attempts``: an int >= 1 (none left nothing to return)."""
        attempts = check_int("attempts", attempts, 1)
        for _ in range(attempts):
            original = self.original(artifact_id, deadline=deadline)
            pinned = False
            try:  # a Ctrl-C lands once ``pinned`` says what it took
                with whole_at_fork(), interrupts_deferred():
                    pinned = self.pin(artifact_id, original)
                    if pinned and hold is not None:
                        hold()
            except BaseException:  # nobody holds it yet: given back
                if pinned and hold is None:
                    self.cache.unpin(artifact_id)
                raise
            if pinned:
                return original, True
            if not self.is_released(original):
                return original, False
            self._counters["evicted_before_pin"] += 1
        return original, False

    def load(self, artifact_id: str, *, deadline: float | None = None) -> GPUKernel:
        """``original`` for a caller that has just missed the cache (``cached``): no second
        lookup, so one request counts one miss. A load finished by another caller meanwhile
        is taken from the cache (and counted as a hit)."""
        validate_artifact_id(artifact_id)
        return self._load_coalesced(artifact_id, deadline)

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
        # Not under ``warnings.catch_warnings``: it swaps the process-wide filter list, which
        # concurrent copies (and the application's threads) would see restored out of order.
        duplicate = copy.deepcopy(original)
        duplicate.trainable_copy = True  # never put back in the cache as its original
        if self.is_released(original) or duplicate.released:
            duplicate.release_gpu_memory()
            raise ValueError(
                f"kernel {original.artifact_id!r} was evicted from the cache while it was "
                "copied; load it again"
            )
        return duplicate

    def put(self, artifact_id: str, kernel: GPUKernel) -> None:
        """Cache ``kernel`` as ``artifact_id``'s original, which every later seed copies: its
        artifact's as verified, or ``ValueError`` (a trainable copy, trained or not; tensors
        other than its payload's; one another cache holds or evicted). Logged when the cache
        has no room for it."""
        if not isinstance(kernel, GPUKernel) or kernel.artifact_id != artifact_id:
            why: str | None = "another artifact's, or not a kernel"
        else:
            why = kernel.differs_from_artifact()
        if why:
            raise ValueError(f"kernel is not the verified kernel of {artifact_id!r}: {why}")
        if not self.cache.put(artifact_id, kernel):
            logger.warning("kernel %s could not be cached", artifact_id)

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

    def _load_coalesced(self, artifact_id: str, deadline: float | None) -> GPUKernel:
        check_deadline(deadline)  # a follower's never reaches the client
        while True:
            with self._lock:
                if artifact_id in self.cache:  # loaded meanwhile by another caller
                    kernel = self.cached(artifact_id)
                    if kernel is not None:
                        return kernel
                future = self._loading.get(artifact_id)
                leader = future is None
                if future is None:
                    future = self._loading[artifact_id] = Future()
            if leader:
                return self._lead(artifact_id, future, deadline)
            self._counters["loads_coalesced"] += 1
            wait = None  # a wait's longest: a further deadline made it raise OverflowError
            if deadline is not None:
                wait = min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX)
            try:
                return future.result(timeout=wait)
            except concurrent.futures.TimeoutError:
                if future.done():  # the leader's own error, not this wait running out
                    raise
                self._counters["load_deadlines_expired"] += 1
                raise UrzaUnavailableError(
                    f"load of kernel {artifact_id!r} did not finish within its deadline "
                    "(waiting for the load in progress, which goes on)"
                ) from None
            except _DeadlineExpired:
                # The leader's deadline passed; this caller may still have time to load.
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    def _lead(
        self, artifact_id: str, future: Future[GPUKernel], deadline: float | None
    ) -> GPUKernel:
        """Load ``artifact_id`` for every caller waiting on ``future``. Its telemetry goes out
        once they have their answer: a sink may wait for what a waiter holds (a manager's lock,
        under which a safe point's command loads), and emitted first it held every waiter up
        for its whole deadline."""
        events: list[tuple[str, float, dict[str, str]]] = []
        try:
            kernel = self._fetch(artifact_id, deadline, events)
        except BaseException as exc:
            future.set_exception(exc)
            raise
        else:
            future.set_result(kernel)
            return kernel
        finally:
            with self._lock:
                del self._loading[artifact_id]
            for name, value, labels in events:
                self.telemetry.emit(name, value, labels=labels)

    def _fetch(
        self, artifact_id: str, deadline: float | None, events: list[tuple[str, float, dict]]
    ) -> GPUKernel:
        """Fetch, verify and build the kernel, and cache it; the telemetry it makes goes to
        ``events``, for ``_lead`` to emit once the waiters have the kernel."""
        started = time.perf_counter_ns()
        try:
            if deadline is None:
                payload, manifest = self.urza_client.fetch(artifact_id)
            else:
                payload, manifest = self.urza_client.fetch(artifact_id, deadline=deadline)
            kernel = GPUKernel.from_binary(payload, manifest, self.device)
        except _Closed:  # the client was closed under the load: an ending, not a failure
            logger.info("kernel load of %s stopped: its Urza client was closed", artifact_id)
            raise
        except Exception as exc:
            self._counters["load_failures"] += 1
            labels = {"artifact_id": artifact_id, "error": type(exc).__name__}
            events.append(("kernel.load_failed", 1.0, labels))
            level = rarely(self._counters["load_failures"], 100, logging.ERROR)  # all in telemetry
            msg = "could not load kernel %s: %s: %s"
            logger.log(level, msg, artifact_id, type(exc).__name__, exc)
            raise
        cached = self.cache.put(artifact_id, kernel)
        elapsed = time.perf_counter_ns() - started
        self.load_latency.add_ns(elapsed)
        self._counters["loads"] += 1
        labels = {"artifact_id": artifact_id, "cached": str(cached).lower()}
        events.append(("kernel.load_ms", elapsed / 1e6, labels))
        logger.info("loaded kernel %s in %.1f ms", artifact_id, elapsed / 1e6)
        return kernel
