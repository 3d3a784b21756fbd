"""How an Urza client reads from a store that may fail, hang or be slow (docs/design.md §6).

``UrzaLibraryClient`` decides *what* to read and how to verify it; a ``ReadGuard`` decides *how*
each read is run, and what a failure means. It never opens a file itself: it runs the callables
the client hands it, and only tells an answer from the store (a missing file, an artifact
refused as corrupt) from a transport failure.

- **Operations.** A fetch (manifest and payload together), a manifest read or a listing is one
  operation (``ReadGuard.operation``), with a ``Budget``: how many attempts each of its reads
  gets, its deadline, and how many of its reads failed or were answered.
- **Breaker.** A ``CircuitBreaker`` gets one outcome per operation, never per read attempt: the
  store answering (even "missing" or "corrupt") is a success, a read that stayed unavailable
  after its attempts is a failure. An open breaker refuses operations; after ``reset_s`` one
  half-open trial, with a single attempt per read, is let through.
- **Retries.** A read (``ReadGuard.call``) that fails in transport (error, timeout) is retried
  with exponential backoff; an answer (``FileNotFoundError``, ``ArtifactIntegrityError``) is
  not. Retrying stops once the breaker is open.
- **Deadlines.** An operation may carry a deadline (an instant of the injected clock,
  ``time.monotonic`` by default): each read waits at most ``min(timeout_s, time left)`` and no
  backoff sleep runs past it. Expiry raises ``_DeadlineExpired``: a private subclass, so callers
  see an ``UrzaUnavailableError``, while the client and the loader within this package can tell
  a coalesced leader's expiry from a store failure.
- **Threads.** Every read runs on an ``urza-io`` daemon thread, since a blocking syscall cannot
  be interrupted: a read that overruns its timeout is abandoned, not killed, and at most
  ``max_stalled_reads`` such threads are alive at once, abandoned ones still blocked included.
- **Close.** ``ReadGuard.close`` refuses new operations and reads and ends the ones under way
  at once: no further attempt or backoff starts, a backoff wait is cut short, and a caller
  waiting on a read (or for an I/O slot) stops waiting; that read is abandoned like one that
  timed out. Each raises the closed client's ``RuntimeError``, and gives the breaker no
  outcome. So no store read holds up a thread, a fetch worker's included, after ``close``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from kasmina.errors import ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError
from kasmina.urza.redaction import describe_error, redact_urls
from kasmina.utils.checks import check_int, check_non_negative, check_real
from kasmina.utils.locks import fork_safe
from kasmina.utils.signed_json import finite_number

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_STALLED_READS",
    "MAX_TIMEOUT_S",
    "STORE_SETTINGS",
    "Budget",
    "CircuitBreaker",
    "ReadGuard",
    "check_deadline",
    "check_store_settings",
]

# The longest a store read may wait (``threading.TIMEOUT_MAX`` is ~292 years): a week.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
_COUNTS = {"retries": 0, "breaker_threshold": 1}  # ints, and their least value
# A client's read settings (``KasminaConfig`` spells each with ``urza_`` in front).
STORE_SETTINGS = (
    "timeout_s",
    "retries",
    "backoff_s",
    "backoff_max_s",
    "breaker_threshold",
    "breaker_reset_s",
)


def check_store_settings(prefix: str = "", **settings: object) -> dict[str, Any]:
    """``settings`` as plain numbers (``kasmina.utils.checks``: a NumPy one as its Python value),
    or ``ValueError`` naming ``prefix`` + the setting for a value outside its range: a
    ``timeout_s`` in (0, a week], ``retries`` >= 0 and ``breaker_threshold`` >= 1 as ints (never
    a bool or a float: ``retries=2.7`` was 2), ``backoff_max_s`` in [0, a week], ``backoff_s``
    and ``breaker_reset_s`` finite and >= 0 (an inf timeout failed every read, a backoff past
    ``threading.TIMEOUT_MAX`` raised OverflowError from its wait, a NaN reset never
    half-opened the breaker, a NaN threshold never opened it). The client's, the breaker's and
    ``KasminaConfig``'s ``urza_*`` settings are held to this one rule."""
    checked: dict[str, Any] = {}
    for name, value in settings.items():
        label = prefix + name
        if name in _COUNTS:
            checked[name] = check_int(label, value, _COUNTS[name])
        elif name != "timeout_s":
            checked[name] = check_non_negative(label, value)
            if name == "backoff_max_s" and checked[name] > MAX_TIMEOUT_S:  # the longest wait
                raise ValueError(
                    f"{label} must be a number in [0, {MAX_TIMEOUT_S:g}], got {value!r}"
                )
        elif not 0 < (timeout := check_real(label, value)) <= MAX_TIMEOUT_S:  # NaN fails it too
            raise ValueError(f"{label} must be a number in (0, {MAX_TIMEOUT_S:g}], got {value!r}")
        else:
            checked[name] = timeout
    return checked


T = TypeVar("T")
# Default cap on a client's live I/O threads (abandoned reads still blocked included).
MAX_STALLED_READS = 4


class _Closed(RuntimeError):
    """The client was closed before, or while, an operation or read ran (``ReadGuard.close``).

    A ``RuntimeError`` like any use of a closed client; private so that the guard neither
    retries it as a transport failure nor counts it for the breaker."""


def check_deadline(deadline: object) -> None:
    """``ValueError`` for a deadline that is no instant of the clock (a finite number:
    ``time.monotonic() + seconds``) nor None: a string failed a comparison deep in a read, and
    NaN was read as no deadline, or as none left. Where a deadline enters: the client's reads,
    the kernel loader's loads (a follower of a load in progress never reaches the client)."""
    if deadline is not None and not finite_number(deadline):
        raise ValueError(
            "deadline must be an instant of the client's clock (a finite number: "
            f"time.monotonic() + seconds) or None, got {deadline!r:.40}"
        )


class _DeadlineExpired(UrzaUnavailableError):
    """An operation's deadline passed before it finished.

    Callers see an ``UrzaUnavailableError``; the subclass only lets a coalesced follower tell
    that its leader ran out of *its own* time (so a follower with time left fetches anew,
    instead of inheriting a failure that says nothing about the store)."""


@dataclass
class Budget:
    """What one operation (a fetch, a manifest read, a listing) may spend, and what it saw.

    ``failed`` and ``answered`` count its reads that failed (transport error, timeout) and
    that the store answered (data, "missing", "refused"): they decide how a deadline expiry
    counts for the breaker (``ReadGuard.operation``)."""

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

    ``ReadGuard`` reports one outcome per operation (a fetch: manifest and payload together),
    never per read attempt, and none for an operation whose deadline had passed before its
    first read (a trial that never reports back is replaced after ``reset_s``)."""

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

    def __init__(
        self, threshold: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        checked = check_store_settings(breaker_threshold=threshold, breaker_reset_s=reset_s)
        self.threshold, self.reset_s = checked["breaker_threshold"], checked["breaker_reset_s"]
        self._clock = clock
        self._lock = fork_safe(threading.Lock())
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


class ReadGuard:
    """Runs one client's store operations and reads (see the module docstring).

    The arguments are the client's own (``UrzaLibraryClient`` validates them): ``url`` names
    the store in messages, ``breaker`` gets the operations' outcomes, and ``lock`` guards the
    counters and I/O thread counts here; the client passes the lock of its own counters, so
    that its ``stats()`` is one snapshot (``snapshot_locked``).

    **Deadlines.** For the breaker, an expiry is a failure when one of the operation's reads
    failed or timed out (the store did not answer in time); when every read it made was
    answered it is a success; and when it expired before its first read it is no outcome at
    all, since the store was never asked. A caller whose deadlines are shorter than the store's
    usual latency therefore opens the breaker: from where it stands the store is unavailable,
    and the open breaker stops it from starting reads that cannot finish in time.

    **Threads.** A read that finds every slot held by an abandoned read is refused at once,
    without starting a thread (an ``UrzaUnavailableError``, counted in
    ``reads_refused_stalled``, and a breaker failure: those reads are the store still hanging).
    A read that finds slots held by live reads waits for one within its own timeout, so healthy
    concurrent fetches of different artifacts are queued, not refused, and the thread count
    stays bounded either way.
    """

    def __init__(
        self,
        url: str,
        breaker: CircuitBreaker,
        lock: threading.Lock,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float,
        backoff_max_s: float,
        max_stalled_reads: int,
        clock: Callable[[], float],
        sleep: Callable[[float], None] | None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.url = redact_urls(url)  # as messages show it: no credentials
        self.secrets = secrets  # the store's credentials, which no error text it shows quotes
        self.breaker = breaker
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.max_stalled_reads = max_stalled_reads
        self._clock = clock
        # The backoff wait: injected (tests with a fake clock), or None for a real-time wait
        # that ``close`` cuts short.
        self._sleep = sleep
        self._closing = threading.Event()
        self._lock = lock
        # Guards the I/O thread counts below (same lock as the counters). Entered as ``with
        # self._lock`` (a C-level exit): a Condition's own ``__exit__`` is Python code, where a
        # Ctrl-C can land after its body and before the release, leaving the lock held for good.
        self._io_changed = fork_safe(threading.Condition(lock))
        self._io_alive = 0  # urza-io threads not yet finished
        self._io_stalled = 0  # of which abandoned by their caller
        self._stats = {
            "reads": 0,
            "read_failures": 0,
            "reads_abandoned": 0,
            "reads_refused_stalled": 0,
            "deadlines_expired": 0,
        }

    def snapshot_locked(self) -> dict[str, Any]:
        """The counters, plus ``io_threads`` and ``stalled_reads``: the ``urza-io`` threads
        alive now, and how many of them were abandoned by their caller. The caller holds
        ``lock``."""
        stats: dict[str, Any] = dict(self._stats)
        stats["io_threads"] = self._io_alive
        stats["stalled_reads"] = self._io_stalled
        return stats

    def forget_reads(self) -> None:
        """In a forked child: the ``urza-io`` threads counted were the parent's, absent here,
        and would never free their slots (with ``max_stalled_reads`` of them at the fork, every
        read of the child was refused or waited out its timeout)."""
        self._io_alive = self._io_stalled = 0

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    def close(self) -> None:
        """Refuse further operations and reads, and end those under way (module docstring):
        no new attempt or backoff starts, a backoff wait ends at once, and a caller waiting on
        a read or for an I/O slot stops waiting (the read is abandoned; its thread ends alone
        when its syscall returns, within the read's timeout when the transport enforces one).
        Each raises ``RuntimeError``, with no breaker outcome."""
        with self._lock:  # wakes the callers waiting on a read or for a slot (``_io_changed``)
            self._closing.set()
            self._io_changed.notify_all()

    def _closed_error(self) -> _Closed:
        return _Closed(f"UrzaLibraryClient for {self.url} is closed")

    def time_left(self, deadline: float | None) -> float | None:
        """Seconds until ``deadline`` (never negative), or None without one: a wait's timeout,
        so at most ``threading.TIMEOUT_MAX`` (a deadline further off, a finite "no deadline",
        made the wait raise OverflowError)."""
        if deadline is None:
            return None
        return min(max(0.0, deadline - self._clock()), threading.TIMEOUT_MAX)

    def expired(self, what: str, detail: str) -> _DeadlineExpired:
        """The error for ``what`` running past its deadline (counted in ``deadlines_expired``)."""
        with self._lock:
            self._stats["deadlines_expired"] += 1
        return _DeadlineExpired(
            f"Urza {what} at {self.url} did not finish within its deadline ({detail})"
        )

    def operation(self, what: str, deadline: float | None, op: Callable[[Budget], T]) -> T:
        """One operation (a fetch, a manifest read, a listing) as one breaker outcome.

        ``op`` gets its ``Budget``: ``retries + 1`` attempts per read, or 1 for the half-open
        trial, and the deadline. The store answering, even "missing" or "corrupt", is a
        success; a read that stayed unavailable after its attempts is a failure. A deadline
        expiry is a failure if a read failed or timed out, a success if every read was
        answered, and no outcome if no read was made: a deadline that had passed before the
        first read is checked before the breaker is asked, so it cannot use up the half-open
        trial. An operation cut short by ``close`` is no outcome (the store was not judged);
        any other exception is a failure, so that a half-open trial always ends.
        """
        if self.closed:
            raise self._closed_error()
        if deadline is not None and self._clock() >= deadline:
            raise self.expired(what, "it had passed before the first read; nothing was read")
        if not self.breaker.allow():
            raise UrzaUnavailableError(f"Urza circuit breaker is open for {self.url}; not trying")
        trial = self.breaker.state == CircuitBreaker.HALF_OPEN
        budget = Budget(what, 1 if trial else self.retries + 1, deadline)
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
        except _Closed:
            raise
        except Exception:  # anything else is a failed operation: never a trial left open
            self.breaker.record_failure()
            raise
        self.breaker.record_success()
        return result

    def call(self, op: Callable[[threading.Event], T], budget: Budget) -> T:
        """One store read with a timeout, retried with backoff up to ``budget.attempts`` times.

        ``op`` gets an event that is set when its read is abandoned (timed out): a streaming
        read checks it per chunk and stops. A missing file (``FileNotFoundError``) or a refused
        object (``ArtifactIntegrityError``) is an answer and is re-raised at once; so is a read
        refused because every I/O slot is held by a stalled read (retrying would only wait on
        the same stalled reads). Anything else is a transport failure, and the last one is
        raised as ``UrzaUnavailableError``. Retrying stops early once the breaker is open
        (another operation opened it), and at the deadline: each attempt waits at most the time
        left, and a backoff sleep that would reach the deadline is not slept. ``close`` (from
        any thread) stops it too: it is checked before every attempt, cuts a backoff wait
        short and ends the wait on a read under way, and the closed client's ``RuntimeError``
        is raised.
        """
        deadline = budget.deadline
        last: BaseException | None = None
        for attempt in range(budget.attempts):
            if self.closed:
                raise self._closed_error() from last
            if attempt and self.breaker.state == CircuitBreaker.OPEN:
                raise UrzaUnavailableError(
                    f"Urza circuit breaker opened for {self.url}; not retrying"
                ) from last
            timeout = self.timeout_s
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0:
                    detail = "no time left for the next read"
                    if last:
                        detail = f"last error: {describe_error(last, self.secrets)}"
                    raise self.expired(budget.what, detail) from last
                timeout = min(timeout, left)
            try:
                result = self._run_read(op, timeout)
            except (FileNotFoundError, ArtifactIntegrityError):
                budget.answered += 1
                raise
            except (UrzaUnavailableError, _Closed):
                raise
            except Exception as exc:  # any transport failure: timeout, connection, HTTP 5xx
                budget.failed += 1
                with self._lock:
                    self._stats["read_failures"] += 1
                last = exc
                logger.warning(
                    "Urza read failed (attempt %d/%d): %s",
                    attempt + 1,
                    budget.attempts,
                    describe_error(exc, self.secrets),
                )
                if attempt + 1 < budget.attempts:
                    # A float power, capped: ``2**attempt`` past 1023 made the product raise
                    # OverflowError (retries are unbounded), where the delay is the cap anyway.
                    delay = min(self.backoff_max_s, self.backoff_s * 2.0 ** min(attempt, 1023))
                    if deadline is not None and self._clock() + delay >= deadline:
                        raise self.expired(
                            budget.what,
                            f"no time left to retry after {delay:.3g} s of backoff; "
                            f"last error: {describe_error(exc, self.secrets)}",
                        ) from exc
                    if self._sleep is None:
                        self._closing.wait(delay)  # ``close`` ends it; checked just above
                    else:
                        self._sleep(delay)
                elif deadline is not None and self._clock() >= deadline:
                    detail = f"last error: {describe_error(exc, self.secrets)}"
                    raise self.expired(budget.what, detail) from exc
            else:
                budget.answered += 1
                return result
        plural = "s" if budget.attempts != 1 else ""
        raise UrzaUnavailableError(
            f"Urza at {self.url} unavailable after {budget.attempts} attempt{plural}: "
            f"{describe_error(last, self.secrets) if last else 'no read ran'}"
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
        ``close`` ends either wait at once (``_Closed``), abandoning a read under way.
        """
        started = time.monotonic()  # real time: this bounds real waits, whatever the clock
        read = _Read()
        with self._lock:
            while self.closed or self._io_alive >= self.max_stalled_reads:
                if self.closed:
                    raise self._closed_error()
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
                with self._lock:
                    self._io_alive -= 1
                    if read.abandoned:
                        self._io_stalled -= 1
                    self._io_changed.notify_all()

        try:
            threading.Thread(target=run, name="urza-io", daemon=True).start()
        except BaseException:
            with self._lock:
                self._io_alive -= 1
                self._io_changed.notify_all()
            raise
        try:
            # Woken when any read ends (its thread notifies) or the guard is closed.
            with self._lock:
                while not future.done():
                    if self.closed:
                        raise self._closed_error()
                    left = timeout_s - (time.monotonic() - started)
                    if left <= 0:
                        raise TimeoutError(f"Urza read did not finish within {timeout_s:.3g} s")
                    self._io_changed.wait(left)
            return future.result()
        finally:
            cancelled.set()  # a no-op once the read is done; otherwise it is abandoned
            with self._lock:
                if not future.done():  # still running: its thread keeps its slot
                    read.abandoned = True
                    self._io_stalled += 1
                    self._stats["reads_abandoned"] += 1
                    self._io_changed.notify_all()
