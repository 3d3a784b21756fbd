"""Commands verified on arrival and applied at the training thread's next safe point.

Why a queue: a controller speaks on its own thread, at any time, while the trainer may be in the
middle of a forward or backward. A CULL that released a kernel then, or a GERMINATE that swapped
optimizers, would pull tensors out from under autograd. So a command is verified the moment it
arrives (signature, freshness, nonce, ranges: the handler's ``accept``), then waits here; it is
carried out only at a safe point on the training thread (the end of ``step()``, the start of
``end_epoch``, or ``manager.apply_pending()`` outside a forward's graph), where no graph of the
manager's is alive (docs/design.md §5).

Why fetches run ahead: a GERMINATE whose kernel is not cached starts its store fetch on a small
worker pool at arrival, bounded by the command's ``timeout`` (manifest, payload, retries and
backoff together: ``KernelLoader.original(..., deadline=...)``); one naming a seed the model
does not have fetches nothing (``known_seed``), then or later: it is refused as that. A safe
point never waits for a fetch: until it is done the command stays queued, and once the deadline
passes it is refused. A
later command for the same seed, or any command that is not a seed command (a rollback, an
optimizer change), waits behind it, so commands still take effect in the order they arrived;
commands for other seeds go ahead.

Why a ROLLBACK may wait too: the kernels its checkpoint attaches to seeds that the cache no
longer holds (a culled seed's, evicted since) would be fetched when it is applied, on the
training thread, for up to the command's timeout. So its first safe point asks which artifacts
it would load (``rollback_kernels``, the manager's: each seed's in the checkpoint that the seed
does not hold now), pins those the cache holds for the command (``PendingCommand.held``) and
starts a fetch for each other one, pinned for it as it arrives. With none to fetch it applies
there; else it stays queued, holding back what follows it, until they are done, and is refused
with an ``UrzaUnavailableError`` when one did not load within its timeout, counted from that
first safe point (it may have waited behind earlier commands). Applied, it finds every kernel
cached.

Why a fetched kernel is pinned: between its fetch and its GERMINATE, another command's fetch
would evict it (least recently used) and release it, and the GERMINATE would be refused, or
load it again on the training thread. So the kernel a command's fetch put in the cache, or that
its safe point found there, is pinned for the command (``PendingCommand.pinned``) until it has
been applied or dropped (``release``); a fetch that finds no room beside the pins serves its
kernel uncached, where nothing evicts it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kasmina.control.commands import KasminaCommand
from kasmina.errors import UrzaUnavailableError
from kasmina.leyline import SeedOperation
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.loader import KernelLoader
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.locks import fork_safe, whole_at_fork

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_PENDING", "CommandQueue", "PendingCommand", "Ready"]

DEFAULT_MAX_PENDING = 256
_GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE


@dataclass(eq=False, slots=True)
class PendingCommand:
    """An accepted command, when it arrived, and its kernel fetch (GERMINATE of an uncached
    artifact only)."""

    command: KasminaCommand
    arrived: float  # time.monotonic()
    fetch: Future[GPUKernel] | None = None
    pinned: bool = False  # its kernel, pinned in the cache for it (under the queue's lock)
    released: bool = False  # applied or dropped: a pin that comes later is given back at once
    ahead: list[Future[GPUKernel]] | None = None  # a ROLLBACK's kernel fetches (once asked)
    held: list[str] = field(default_factory=list)  # a ROLLBACK's kernels, pinned for it
    until: float = math.inf  # a ROLLBACK's fetches' deadline, from its first safe point

    @property
    def deadline(self) -> float:
        return self.arrived + self.command.timeout_s if self.command.timeout_s > 0 else math.inf

    @property
    def seed_id(self) -> str | None:
        return None if self.command.seed is None else self.command.seed.seed_id

    @property
    def artifact_id(self) -> str | None:
        seed = self.command.seed
        if seed is None or seed.operation != _GERMINATE or not seed.artifact_id:
            return None
        return seed.artifact_id


Ready = tuple[PendingCommand, GPUKernel | None, BaseException | None]


class CommandQueue:
    """A bounded FIFO of accepted commands with their kernel fetches running ahead.

    ``submit`` may be called from any thread; ``take_ready`` only from the thread that applies
    commands. ``fetch_workers`` threads at most fetch kernels (each fetch is bounded by its
    command's deadline, and the store client bounds its own I/O threads).
    """

    def __init__(
        self,
        loader: KernelLoader,
        rollback_kernels: Callable[[int], list[str]] | None = None,
        known_seed: Callable[[str], bool] | None = None,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        fetch_workers: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rollback_kernels(epoch)``: the artifacts a ROLLBACK to ``epoch`` would load (asked
        on the applying thread); None: a ROLLBACK's kernels are not fetched ahead.
        ``known_seed(seed_id)``: whether the model has that seed (any thread); a GERMINATE of
        one it has not is refused when applied, so its kernel is never fetched or pinned for it
        (None: every seed is known)."""
        if max_pending < 1 or fetch_workers < 1:
            raise ValueError("max_pending and fetch_workers must be >= 1")
        self.loader = loader
        self.rollback_kernels = rollback_kernels
        self.known_seed = known_seed
        self.max_pending = max_pending
        self.fetch_workers = fetch_workers
        self._clock = clock
        # Free in a forked child (``fork_safe``): a command another thread was queueing, or a
        # fetch worker finishing, at the fork may be half done in the child's copy, whose
        # close() then drops the commands queued there, each reported, rather than hang.
        self._lock = fork_safe(threading.Lock())
        self._queue: deque[PendingCommand] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        fork_safe(self)  # ``_at_fork_reinit``

    def _at_fork_reinit(self) -> None:
        """After ``fork()``, in the child: the fetch workers were the parent's threads, gone
        there, and a pool whose threads are gone runs nothing more (a GERMINATE's fetch waited
        out its timeout, or for good without one). The child makes a pool of its own when it
        next fetches, and a queued command whose fetch was running starts it again at its next
        safe point (a ROLLBACK asks for its kernels again, its timeout counted afresh from
        there). Its lock is free (``fork_safe``)."""
        self._pool = None
        for entry in self._queue:
            if entry.fetch is not None and not entry.fetch.done():
                entry.fetch = None
            if entry.ahead is not None and not all(f.done() for f in entry.ahead):
                entry.ahead = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._queue)

    def submit(self, command: KasminaCommand, fetch: Future[GPUKernel] | None = None) -> bool:
        """Queue an accepted command (starting its kernel fetch if needed, unless ``fetch``,
        one already made for it, is given); False when full or closed."""
        entry = PendingCommand(command, self._clock(), fetch)
        with self._lock:
            if self._closed or len(self._queue) >= self.max_pending:
                return False
            self._queue.append(entry)
        seed = command.seed  # only a GERMINATE of an uncached artifact for a known seed fetches
        if fetch is None and seed is not None and seed.operation == _GERMINATE:
            if self.knows(seed.seed_id):  # else asked again at its safe point (``_poll``)
                self._start_fetch(entry)
        return True

    def take_ready(self, *, wait: bool = False) -> list[Ready]:
        """Remove and return, in arrival order, every command that can be applied now, each
        with its fetched kernel or fetch error (:meth:`poll_ready`, then :meth:`take`)."""
        return self.take(self.poll_ready(wait=wait))

    def poll_ready(self, *, wait: bool = False) -> list[Ready]:
        """Every queued command that can be applied now, in arrival order, each with its
        fetched kernel or fetch error; none is removed (:meth:`take` does, without waiting).

        A GERMINATE whose fetch is still running stays queued (``wait=True`` waits for it, up
        to its deadline) and holds back later commands for its seed and every later non-seed
        command; once its deadline has passed it is returned with an ``UrzaUnavailableError``.
        """
        with self._lock:
            if not self._queue:  # the common case at every step: nothing arrived
                return []
            entries = list(self._queue)
        ready: list[Ready] = []
        held_seeds: set[str] = set()
        hold_all = held_any = False
        for entry in entries:
            seed_id = entry.seed_id
            held = hold_all or (seed_id in held_seeds if seed_id is not None else held_any)
            result = None if held else self._poll(entry, wait)
            if result is None:  # stays queued, and holds back what must follow it
                held_any = True
                if seed_id is None:
                    hold_all = True
                else:
                    held_seeds.add(seed_id)
                continue
            ready.append((entry, *result))
        return ready

    def take(self, ready: list[Ready]) -> list[Ready]:
        """Remove ``ready`` (from :meth:`poll_ready`) from the queue and return those still in
        it; none if the queue closed meanwhile. ``close`` and ``take_all`` (a relay, on another
        thread) remove entries too, and report each refused: none of them may be taken and
        reported again, let alone applied on this rank alone."""
        with self._lock:
            if self._closed:
                return []
            queued = {id(entry) for entry in self._queue}
            ready = [r for r in ready if id(r[0]) in queued]
            taken = {id(entry) for entry, _, _ in ready}
            self._queue = deque(e for e in self._queue if id(e) not in taken)
        return ready

    def put_back(self, entries: list[PendingCommand]) -> list[PendingCommand]:
        """Return taken commands that never began (a safe point was interrupted) to the front
        of the queue, in their order, for the next ``take_ready``; returns those it cannot take
        back because the queue is closed (the caller reports them).

        The front keeps every order ``take_ready`` promises: a command that was taken was held
        back by nothing queued before it. The bound may be exceeded until they are taken: they
        were accepted when there was room.
        """
        with self._lock:
            if self._closed:
                return list(entries)
            self._queue.extendleft(reversed(entries))
        return []

    def release(self, entries: list[PendingCommand]) -> None:
        """Give back the kernel pins of ``entries``, applied or dropped (an entry put back in
        the queue keeps its pin for its next safe point)."""
        for entry in entries:
            with self._lock:
                if any(queued is entry for queued in self._queue):
                    continue
                pinned, entry.pinned, entry.released = entry.pinned, False, True
                held, entry.held = entry.held, []
            if pinned:
                self.loader.cache.unpin(entry.artifact_id)
            for artifact_id in held:
                self.loader.cache.unpin(artifact_id)

    def _hold(self, entry: PendingCommand) -> None:
        """Record the pin just taken on ``entry``'s kernel; given back at once if the entry
        was released meanwhile (a ``close`` on another thread dropped it)."""
        with self._lock:
            keep = not entry.released and not entry.pinned
            entry.pinned = entry.pinned or keep
        if not keep:
            self.loader.cache.unpin(entry.artifact_id)

    def _poll(
        self, entry: PendingCommand, wait: bool
    ) -> tuple[GPUKernel | None, BaseException | None] | None:
        """``(kernel, error)`` once ``entry`` can be applied; None while its fetch runs."""
        if entry.command.rollback is not None and self.rollback_kernels is not None:
            return self._poll_rollback(entry, wait)
        artifact_id = entry.artifact_id
        if artifact_id is not None and entry.fetch is None and not self.knows(entry.seed_id):
            return None, None  # refused as the unknown seed it names: nothing to fetch
        if entry.fetch is None and artifact_id is not None and not entry.pinned:
            with whole_at_fork(), interrupts_deferred():  # pin and record: whole, or neither
                pinned = self.loader.pin(artifact_id)
                if pinned:
                    self._hold(entry)  # cached: kept there until the command has applied
            if not pinned:  # not cached (any more): fetch it now (pinned when loaded)
                self._start_fetch(entry, unless_cached=False)
        fetch = entry.fetch
        if fetch is None:
            return None, None
        if not fetch.done() and wait:
            remaining = entry.deadline - self._clock()
            if remaining > 0:
                try:
                    fetch.result(timeout=remaining)
                except Exception:  # a failed fetch is inspected below like any other
                    logger.debug("fetch for command %s failed", entry.command.command_id)
        if fetch.done():
            if fetch.cancelled():  # only ``close`` cancels a fetch: the command is dropped
                return None, UrzaUnavailableError(
                    f"fetching {entry.artifact_id} was cancelled (the manager is closing)"
                )
            error = fetch.exception()
            return (None, error) if error is not None else (fetch.result(), None)
        if self._clock() < entry.deadline:
            return None
        return None, UrzaUnavailableError(
            f"fetching {entry.artifact_id} did not finish within the command's "
            f"{entry.command.timeout_s:g} s timeout"
        )

    def take_all(self) -> list[PendingCommand]:
        """Remove and return every queued command (the queue stays open; a fetch under way for
        one goes on and fills the cache)."""
        with self._lock:
            taken = list(self._queue)
            self._queue.clear()
        return taken

    def close(self) -> list[PendingCommand]:
        """Refuse new commands, drop the queued ones (returned) and stop the fetch workers
        without waiting for them: a fetch not yet started is cancelled, never run; one running
        ends when the store client is closed (``manager.close`` closes it next: the read under
        way is abandoned, no retry starts), else by its command's deadline. The interpreter
        still joins the workers at exit (``concurrent.futures`` does), so exit waits for a
        running fetch unless the client was closed."""
        with self._lock:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        return dropped

    def fetch(self, artifact_id: str, deadline: float | None) -> Future[GPUKernel] | None:
        """``loader.original(artifact_id, deadline=deadline)`` on the fetch workers (at most
        ``fetch_workers`` threads, for every caller: the queue's own fetch-ahead and a
        multi-rank sync's prepares); None once the queue is closed."""
        return self._submit(self.loader.original, artifact_id, deadline=deadline)

    def _submit(
        self, fn: Callable[..., GPUKernel], *args: Any, **kwargs: Any
    ) -> Future[GPUKernel] | None:
        """``fn(*args, **kwargs)`` on the fetch workers; None once the queue is closed."""
        with self._lock:
            if self._closed:
                return None
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.fetch_workers, thread_name_prefix="kasmina-fetch"
                )
            return self._pool.submit(fn, *args, **kwargs)

    def _start_fetch(self, entry: PendingCommand, *, unless_cached: bool = True) -> None:
        """Start ``entry``'s kernel fetch (at arrival only ``unless_cached``)."""
        artifact_id = entry.artifact_id
        if artifact_id is None or (unless_cached and artifact_id in self.loader.cache):
            return
        deadline = entry.deadline if math.isfinite(entry.deadline) else None
        entry.fetch = self._submit(self._fetch_pinned, entry, artifact_id, deadline)

    def knows(self, seed_id: str | None) -> bool:
        """Whether a command for ``seed_id`` (None: no seed's) may need its kernel fetched: not
        one for a seed the model does not have (``known_seed``)."""
        return self.known_seed is None or seed_id is None or self.known_seed(seed_id)

    def _fetch_pinned(
        self, entry: PendingCommand, artifact_id: str, deadline: float | None
    ) -> GPUKernel:
        """A fetch worker's load of ``entry``'s kernel, pinned for it as soon as it is cached
        (``KernelLoader.pinned_original``: loaded again, a few times within the
        deadline, when another fetch's put evicts it before the pin; one evicted every time is
        handed on to be refused as evicted). A kernel served uncached (no room beside the pins)
        needs no pin."""
        hold = lambda: self._hold(entry)  # noqa: E731 (with the pin: a fork sees both or none)
        kernel, _ = self.loader.pinned_original(artifact_id, deadline=deadline, hold=hold)
        return kernel

    def _poll_rollback(
        self, entry: PendingCommand, wait: bool
    ) -> tuple[None, BaseException | None] | None:
        """``_poll`` for a ROLLBACK (see the module docstring): its kernels asked for, pinned
        or fetched, at the first call (its timeout counts from there: it may have waited behind
        earlier commands); None while a fetch runs and that timeout has not passed."""
        rollback, kernels_of = entry.command.rollback, self.rollback_kernels
        if entry.ahead is None and rollback is not None and kernels_of is not None:
            timeout = entry.command.timeout_s
            entry.until = self._clock() + timeout if timeout > 0 else math.inf
            fetches: list[Future[GPUKernel]] = []
            deadline = entry.until if math.isfinite(entry.until) else None
            try:
                for artifact_id in kernels_of(rollback.target_epoch):
                    with whole_at_fork(), interrupts_deferred():  # as ``_poll``'s pin
                        if self.loader.pin(artifact_id):
                            self._hold_for(entry, artifact_id)
                            continue
                    if fetch := self._submit(self._fetch_held, entry, artifact_id, deadline):
                        fetches.append(fetch)
            except Exception as exc:  # the checkpoint unread, say: its application reports why
                msg = "rollback %s: its kernels not fetched ahead: %s: %s"
                logger.info(msg, entry.command.command_id, type(exc).__name__, exc)
            entry.ahead = fetches  # set once asked (a Ctrl-C in the asking asks again)
        ahead = entry.ahead or []
        running = [f for f in ahead if not f.done()]
        if running and wait and (remaining := entry.until - self._clock()) > 0:
            concurrent.futures.wait(running, timeout=remaining)
        if all(f.done() for f in ahead):
            for fetch in ahead:
                error = None if fetch.cancelled() else fetch.exception()
                if error is not None:
                    return None, error
            return None, None
        if self._clock() < entry.until:
            return None
        return None, UrzaUnavailableError(
            "fetching the kernels its checkpoint attaches did not finish within the rollback's "
            f"{entry.command.timeout_s:g} s timeout"
        )

    def _hold_for(self, entry: PendingCommand, artifact_id: str) -> None:
        """Record a pin just taken on ``artifact_id`` for ``entry`` (a ROLLBACK); given back at
        once if the entry was released meanwhile."""
        with self._lock:
            keep = not entry.released
            if keep:
                entry.held.append(artifact_id)
        if not keep:
            self.loader.cache.unpin(artifact_id)

    def _fetch_held(
        self, entry: PendingCommand, artifact_id: str, deadline: float | None
    ) -> GPUKernel:
        """A fetch worker's load of one of a ROLLBACK's kernels, pinned for it once cached (a
        kernel served uncached is loaded again when the ROLLBACK applies)."""
        hold = lambda: self._hold_for(entry, artifact_id)  # noqa: E731 (as ``_fetch_pinned``'s)
        kernel, _ = self.loader.pinned_original(artifact_id, deadline=deadline, hold=hold)
        return kernel
