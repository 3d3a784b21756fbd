"""A store never holds up a training step: fetches end by their deadline, retries and backoff
included, and a store that hangs in a blocking call (a stalled HTTP server, a FIFO payload)
cannot make the client's thread count grow past ``max_stalled_reads``.

Every fault is real: a loopback HTTP server that sends the payload's headers and first half and
then blocks until the test releases it, and a FIFO that blocks ``open`` until a writer comes
(read through a wrapping filesystem: a plain local store refuses a FIFO before opening it).
Each test releases what it stalled, so no thread outlives it in a blocking call.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kasmina.errors import UrzaUnavailableError
from kasmina.urza import resilience
from kasmina.urza.artifact import Manifest
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.loader import KernelLoader
from kasmina.urza.publish import publish_artifact, publish_payload
from kasmina.utils.telemetry import TelemetryReporter
from tests.urza.helpers import (
    FakeClock,
    FlakyFS,
    StalledServer,
    io_threads,
    wait_for_io_threads,
)

# Liveness bound on "returns by its deadline": generous, since a loaded CI machine may be slow;
# an unbounded fetch in these tests would take far longer (or forever).
SLACK_S = 5.0
DEADLINE = "did not finish within its deadline"


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, publisher: PublisherKey
) -> tuple[Path, Manifest]:
    """One real exported artifact (export once per module: it is slow)."""
    store = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    manifest = publish_artifact(module, (torch.randn(2, 4),), str(store), "mlp", publisher)
    return store, manifest


@pytest.fixture
def store(tmp_path: Path, published: tuple[Path, Manifest]) -> tuple[Path, Manifest]:
    """A private copy of the published store that a test may tamper with."""
    src, manifest = published
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst, manifest


@pytest.fixture
def stalled(store: tuple[Path, Manifest]) -> Iterator[StalledServer]:
    with StalledServer(store[0]) as server:
        try:
            yield server
        finally:
            server.release()
            wait_for_io_threads(0)


@contextmanager
def thread_peaks() -> Iterator[dict[str, int]]:
    """Samples the live thread count and the ``urza-io`` count every few milliseconds; yields
    their peaks (and the baseline, this sampler included) as they are found."""
    wait_for_io_threads(0)  # reads an earlier test abandoned must not count here
    stop = threading.Event()
    peaks = {"baseline": 0, "active": 0, "io": 0}

    def sample() -> None:
        while not stop.is_set():
            peaks["active"] = max(peaks["active"], threading.active_count())
            peaks["io"] = max(peaks["io"], io_threads())
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, name="thread-sampler", daemon=True)
    sampler.start()
    peaks["baseline"] = threading.active_count()
    try:
        yield peaks
    finally:
        stop.set()
        sampler.join(timeout=5)


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """``fn()`` on a thread; its result or exception ends up in the returned dict."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def http_client(url: str, trusted: TrustedPublishers, **kwargs: Any) -> UrzaLibraryClient:
    """A client whose per-read timeout is long: the deadlines are what bound these fetches."""
    kwargs.setdefault("timeout_s", 10.0)
    kwargs.setdefault("retries", 0)
    kwargs.setdefault("backoff_s", 0.0)
    return UrzaLibraryClient(url, trusted, **kwargs)


def make_loader(client: Any) -> KernelLoader:
    return KernelLoader(client, GPUKernelCache(64), torch.device("cpu"), TelemetryReporter())


# --- the client ---------------------------------------------------------------------------


@pytest.mark.parametrize("deadline", ["soon", float("nan"), float("inf"), [1.0]], ids=repr)
@pytest.mark.parametrize("call", ["get_manifest", "fetch"])
def test_a_deadline_that_is_no_instant_is_refused_before_any_read(
    store: tuple[Path, Manifest], trusted: TrustedPublishers, call: str, deadline: object
) -> None:
    """``get_manifest(id, deadline="soon")`` raised a comparison's TypeError ('>=' not
    supported) from inside the read, and ``deadline=nan`` was read as no deadline at all.
    Either is a ``ValueError`` naming the deadline, before the store is read."""
    root, manifest = store
    urza = UrzaLibraryClient(str(root), trusted, retries=0)
    try:
        before = urza.stats()
        with pytest.raises(ValueError, match="deadline must be an instant of the client's clock"):
            getattr(urza, call)(manifest.artifact_id, deadline=deadline)
        assert urza.stats() == before
        in_time = time.monotonic() + 60
        assert urza.get_manifest(manifest.artifact_id, deadline=in_time) == manifest
    finally:
        urza.close()


def test_stalled_payload_fetch_ends_by_its_deadline(stalled, store, trusted) -> None:
    _, manifest = store
    urza = http_client(stalled.url, trusted, breaker_threshold=1)
    deadline = time.monotonic() + 1.0
    with pytest.raises(UrzaUnavailableError, match=DEADLINE) as info:
        urza.fetch(manifest.artifact_id, deadline=deadline)
    assert time.monotonic() < deadline + SLACK_S
    assert isinstance(info.value.__cause__, TimeoutError)
    assert stalled.payload_requests == 1
    # The read timed out: the store did not answer in time, a failure for the breaker.
    assert urza.breaker.state == "open"
    assert urza.stats()["deadlines_expired"] == 1


def test_retries_and_backoff_do_not_extend_the_deadline(stalled, store, trusted) -> None:
    _, manifest = store
    # Unbounded, 20 retries of a 0.4 s read would take over 8 s.
    urza = http_client(
        stalled.url, trusted, timeout_s=0.4, retries=20, backoff_s=0.05, max_stalled_reads=32
    )
    deadline = time.monotonic() + 1.0
    with pytest.raises(UrzaUnavailableError, match=DEADLINE):
        urza.fetch(manifest.artifact_id, deadline=deadline)
    assert time.monotonic() < deadline + SLACK_S
    assert 2 <= urza.stats()["reads"] < 21  # it did retry, and stopped at the deadline


def test_stalled_http_payload_never_leaks_threads(stalled, store, trusted) -> None:
    _, manifest = store
    cap = 3
    urza = http_client(stalled.url, trusted, max_stalled_reads=cap, breaker_threshold=100)
    with thread_peaks() as peaks:
        for _ in range(10):
            with pytest.raises(UrzaUnavailableError):
                urza.fetch(manifest.artifact_id, deadline=time.monotonic() + 0.2)
            assert io_threads() <= cap
    stats = urza.stats()
    # The first ``cap`` fetches read a manifest and stall on the payload; the rest are refused
    # before their manifest read, without a thread.
    assert stats["reads"] == 2 * cap and stats["reads_refused_stalled"] == 10 - cap
    assert stats["io_threads"] == stats["stalled_reads"] == cap
    assert peaks["io"] <= cap
    # Besides the client's threads: one server handler per stalled connection, fsspec's
    # event-loop thread and some slack.
    assert peaks["active"] <= peaks["baseline"] + cap + cap + 2
    # Released, every abandoned read ends, its slot frees, and the store serves again.
    stalled.release()
    wait_for_io_threads(0)
    assert urza.stats()["io_threads"] == 0 and urza.stats()["stalled_reads"] == 0
    payload, fetched = urza.fetch(manifest.artifact_id, deadline=time.monotonic() + 5.0)
    assert fetched == manifest and len(payload) == manifest.size


def unblock_fifo(path: Path, timeout: float = 10.0) -> None:
    """Open and close ``path`` for writing until no read is blocked on it (each open lets the
    readers blocked in ``open`` through, and they see end-of-file at once)."""
    end = time.monotonic() + timeout
    while io_threads() and time.monotonic() < end:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as exc:  # ENXIO: no reader has it open right now
            if exc.errno != errno.ENXIO:
                raise
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_payload_never_leaks_threads(store, trusted) -> None:
    """A read that blocks inside ``open`` on a store that is not a plain local directory (a
    local FIFO seen through a wrapping filesystem: a local store refuses it before opening)."""
    root, manifest = store
    payload = root / f"{manifest.artifact_id}.pt2"
    payload.unlink()
    os.mkfifo(payload)
    cap = 2
    urza = UrzaLibraryClient(
        str(root), trusted, timeout_s=0.2, retries=0, max_stalled_reads=cap, breaker_threshold=100
    )
    urza._fs = FlakyFS(urza._fs)
    try:
        with thread_peaks() as peaks:
            for _ in range(6):
                with pytest.raises(UrzaUnavailableError):
                    urza.fetch(manifest.artifact_id)
        assert urza.stats()["reads_refused_stalled"] == 6 - cap
        assert peaks["io"] <= cap
        assert peaks["active"] <= peaks["baseline"] + cap + 1
        # Deadlines bound a fetch against a FIFO just the same.
        deadline = time.monotonic() + 0.3
        with pytest.raises(UrzaUnavailableError):
            urza.fetch(manifest.artifact_id, deadline=deadline)
        assert time.monotonic() < deadline + SLACK_S
    finally:
        unblock_fifo(payload)
    wait_for_io_threads(0)


def test_coalesced_follower_returns_at_its_own_deadline(stalled, store, trusted) -> None:
    _, manifest = store
    urza = http_client(stalled.url, trusted)
    leader, led = run_in_thread(
        lambda: urza.fetch(manifest.artifact_id, deadline=time.monotonic() + 10.0)
    )
    stalled.wait_for_payload_requests(1)
    deadline = time.monotonic() + 0.3
    with pytest.raises(UrzaUnavailableError, match=DEADLINE):
        urza.fetch(manifest.artifact_id, deadline=deadline)
    assert time.monotonic() < deadline + SLACK_S
    assert leader.is_alive()  # the shared fetch goes on
    assert urza.stats()["coalesced"] == 1
    stalled.release()
    leader.join(timeout=10)
    assert "error" not in led and led["result"][1] == manifest
    assert urza.breaker.state == "closed"


def test_follower_outlives_its_leaders_deadline(stalled, store, trusted) -> None:
    """A leader that ran out of its own time says nothing about the follower's: a follower
    with time left fetches anew instead of inheriting the leader's expiry."""
    _, manifest = store
    urza = http_client(stalled.url, trusted)
    leader, led = run_in_thread(
        lambda: urza.fetch(manifest.artifact_id, deadline=time.monotonic() + 1.5)
    )
    stalled.wait_for_payload_requests(1)
    follower, followed = run_in_thread(
        lambda: urza.fetch(manifest.artifact_id, deadline=time.monotonic() + 10.0)
    )
    end = time.monotonic() + 5
    while urza.stats()["coalesced"] < 1 and time.monotonic() < end:
        time.sleep(0.005)
    leader.join(timeout=10)
    assert isinstance(led.get("error"), UrzaUnavailableError)
    stalled.wait_for_payload_requests(2)  # the follower's own read
    stalled.release()
    follower.join(timeout=10)
    assert "error" not in followed and followed["result"][1] == manifest
    stats = urza.stats()
    assert stats["fetches"] == 2 and stats["coalesced"] == 1


def test_a_follower_whose_deadline_is_far_off_waits_for_the_shared_fetch(
    stalled, store, trusted
) -> None:
    """A finite deadline centuries away (a "no deadline" of ``now + 1e10``) made a coalesced
    follower's wait raise OverflowError (past ``threading.TIMEOUT_MAX``), of the client and
    of the loader, while a leader with the same deadline fetched."""
    _, manifest = store
    urza = http_client(stalled.url, trusted)
    loader = make_loader(urza)
    far = time.monotonic() + 1e10
    leader, led = run_in_thread(lambda: loader.original(manifest.artifact_id, deadline=far))
    stalled.wait_for_payload_requests(1)
    fetcher, fetched = run_in_thread(lambda: urza.fetch(manifest.artifact_id, deadline=far))
    waiter, waited = run_in_thread(lambda: loader.original(manifest.artifact_id, deadline=far))
    end = time.monotonic() + 5
    while (
        urza.stats()["coalesced"] < 1 or loader.counters["loads_coalesced"] < 1
    ) and time.monotonic() < end:
        time.sleep(0.005)
    stalled.release()
    for thread in (leader, fetcher, waiter):
        thread.join(timeout=10)
    assert "error" not in fetched and fetched["result"][1] == manifest
    assert "error" not in led and waited.get("result") is led["result"]
    assert urza.stats()["coalesced"] == 1 and loader.counters["loads_coalesced"] == 1


class HeldManifestFS(FlakyFS):
    """Holds the first manifest open until ``release`` is set (``held`` says it began), and
    says when a later one begins (``reopened``)."""

    def __init__(self, fs: Any) -> None:
        super().__init__(fs)
        self.held, self.release, self.reopened = (threading.Event() for _ in range(3))

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if str(path).endswith(".manifest.json"):
            if self.held.is_set():
                self.reopened.set()
            else:
                self.held.set()
                self.release.wait(timeout=10)  # bounded: a broken test cannot hang
        return super().open(path, mode, **kwargs)


def held_fetch(
    store: tuple[Path, Manifest], trusted: TrustedPublishers
) -> tuple[UrzaLibraryClient, FakeClock, HeldManifestFS, threading.Thread, dict[str, Any]]:
    """A client on a fake clock whose leader fetch (deadline 100 s on) is held in its manifest
    read; returns the client, clock, filesystem and the leader's thread and outcome."""
    root, manifest = store
    clock = FakeClock()
    urza = UrzaLibraryClient(str(root), trusted, retries=0, clock=clock, sleep=clock.sleep)
    fs = urza._fs = HeldManifestFS(urza._fs)
    deadline = clock.now + 100.0
    leader, led = run_in_thread(lambda: urza.fetch(manifest.artifact_id, deadline=deadline))
    assert fs.held.wait(timeout=10)
    return urza, clock, fs, leader, led


def test_a_follower_woken_by_its_leaders_expiry_leads_at_once(store, trusted) -> None:
    """The leader takes its fetch out of the in-flight table before completing it, so a
    follower woken by the leader's deadline expiry (with time of its own left) cannot find the
    finished fetch there again: it leads a new one at once, without waiting for the leader to
    go on, and is counted as coalesced once, not once per look at the finished fetch."""
    _, manifest = store
    artifact = manifest.artifact_id
    urza, clock, fs, leader, led = held_fetch(store, trusted)
    shared = urza._inflight[artifact]
    seen: dict[str, Any] = {}

    def on_done(future: Any) -> None:
        # Runs on the leader's thread as it completes the fetch, after its waiters are woken.
        seen["still_in_flight"] = urza._inflight.get(artifact) is future
        # Holds the leader here: the follower must lead its own fetch meanwhile.
        seen["follower_led"] = fs.reopened.wait(timeout=10.0)
        seen["coalesced"] = urza.stats()["coalesced"]

    shared.add_done_callback(on_done)
    follower, followed = run_in_thread(lambda: urza.fetch(artifact, deadline=clock.now + 1000.0))
    end = time.monotonic() + 10
    while urza.stats()["coalesced"] < 1 and time.monotonic() < end:
        time.sleep(0.001)  # polls a state; the outcome does not depend on timing
    clock.now += 200.0  # past the leader's deadline, not the follower's
    fs.release.set()
    leader.join(timeout=10)
    follower.join(timeout=10)
    assert isinstance(led.get("error"), UrzaUnavailableError)
    assert DEADLINE in str(led["error"])
    assert "error" not in followed and followed["result"][1] == manifest
    assert seen == {"still_in_flight": False, "follower_led": True, "coalesced": 1}
    stats = urza.stats()
    assert stats["fetches"] == 2 and stats["coalesced"] == 1
    assert urza._inflight == {}


def test_a_leader_retires_only_its_own_fetch(store, trusted) -> None:
    """A leader finishing removes its own entry from the in-flight table, never another
    fetch's entry for the same id (one put there in its place stays)."""
    _, manifest = store
    artifact = manifest.artifact_id
    urza, _, fs, leader, led = held_fetch(store, trusted)
    ours = urza._inflight[artifact]
    other = urza._inflight[artifact] = Future()
    fs.release.set()
    leader.join(timeout=10)
    assert "error" not in led and led["result"][1] == manifest
    assert ours.result(timeout=0) is led["result"]
    assert urza._inflight == {artifact: other}


def test_backoff_sleeps_never_pass_the_deadline(store, trusted) -> None:
    root, manifest = store
    clock = FakeClock()
    sleep, sleeps = clock.sleep, clock.sleeps

    urza = UrzaLibraryClient(
        str(root),
        trusted,
        retries=10,
        backoff_s=0.1,
        backoff_max_s=1.0,
        breaker_threshold=1,
        clock=clock,
        sleep=sleep,
    )
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    deadline = clock.now + 1.0
    with pytest.raises(UrzaUnavailableError, match=DEADLINE) as info:
        urza.fetch(manifest.artifact_id, deadline=deadline)
    assert isinstance(info.value.__cause__, ConnectionError)
    # 0.1, 0.2, 0.4; the next (0.8) would pass the deadline, so it is not slept.
    assert sleeps == [0.1, 0.2, 0.4] and clock.now <= deadline
    assert flaky.reads_of(".manifest.json") == 4
    assert urza.breaker.state == "open"  # reads failed: a store failure


def test_a_deadline_reached_exactly_is_reached(store, trusted) -> None:
    """At the deadline there is no time left: a backoff ending there is not slept, a last
    read failing there ends in the deadline's error (on which a follower with time left fetches
    anew), and a fetch whose manifest read took it there reads no payload; every read that one
    made was answered, so it is a breaker success."""
    root, manifest = store
    clock = FakeClock()
    sleep, sleeps = clock.sleep, clock.sleeps

    urza = UrzaLibraryClient(str(root), trusted, retries=3, backoff_s=0.1, clock=clock, sleep=sleep)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    with pytest.raises(UrzaUnavailableError, match=DEADLINE):
        urza.fetch(manifest.artifact_id, deadline=clock.now + 0.1)
    assert sleeps == [] and flaky.reads_of(".manifest.json") == 1

    urza = UrzaLibraryClient(str(root), trusted, retries=0, breaker_threshold=2, clock=clock)
    flaky = urza._fs = FlakyFS(urza._fs)
    opened = flaky.open
    deadline = 0.0

    def open_taking_the_clock_to_the_deadline(path: str, mode: str = "rb", **kwargs: Any) -> Any:
        clock.now = deadline
        return opened(path, mode, **kwargs)

    flaky.open = open_taking_the_clock_to_the_deadline  # type: ignore[method-assign]
    flaky.down = True
    deadline = clock.now + 5
    with pytest.raises(UrzaUnavailableError, match=DEADLINE):
        urza.fetch(manifest.artifact_id, deadline=deadline)
    assert urza.stats()["deadlines_expired"] == 1 and urza.stats()["read_failures"] == 1
    flaky.down = False
    deadline = clock.now + 5
    with pytest.raises(UrzaUnavailableError, match="no time left for the next read"):
        urza.fetch(manifest.artifact_id, deadline=deadline)
    assert flaky.reads_of(".pt2") == 0 and urza.stats()["read_failures"] == 1
    flaky.down = True
    with pytest.raises(UrzaUnavailableError, match="after 1 attempt"):
        urza.fetch(manifest.artifact_id)
    assert urza.breaker.state == "closed"  # the answered fetch reset the count of failures


def test_an_expired_deadline_reads_nothing_and_is_no_breaker_outcome(store, trusted) -> None:
    root, manifest = store
    clock = FakeClock()
    urza = UrzaLibraryClient(
        str(root), trusted, retries=0, breaker_threshold=1, breaker_reset_s=10.0, clock=clock
    )
    flaky = urza._fs = FlakyFS(urza._fs)
    for call in (urza.fetch, urza.get_manifest):
        with pytest.raises(UrzaUnavailableError, match="passed before the first read"):
            call(manifest.artifact_id, deadline=clock.now)
    assert not flaky.reads and urza.breaker.state == "closed"
    # Nor does it use up the half-open trial.
    flaky.down = True
    with pytest.raises(UrzaUnavailableError, match="after 1 attempt"):
        urza.fetch(manifest.artifact_id)
    assert urza.breaker.state == "open"
    clock.now += 10
    with pytest.raises(UrzaUnavailableError, match=DEADLINE):
        urza.fetch(manifest.artifact_id, deadline=clock.now - 1)
    flaky.down = False
    payload, fetched = urza.fetch(manifest.artifact_id, deadline=clock.now + 60)
    assert fetched == manifest and urza.breaker.state == "closed"
    assert urza.get_manifest(manifest.artifact_id, deadline=clock.now + 60) == manifest


def test_live_reads_wait_for_a_slot_instead_of_being_refused(store, publisher, trusted) -> None:
    """The cap bounds threads, not healthy concurrency: with every slot held by a live read,
    a new read waits for one (within its timeout) and both fetches succeed."""
    root, manifest = store
    publish_payload(b"second", str(root), "bp", publisher, "second")
    urza = UrzaLibraryClient(str(root), trusted, timeout_s=5.0, retries=0, max_stalled_reads=1)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.delay_s = 0.2
    first, out1 = run_in_thread(lambda: urza.fetch(manifest.artifact_id))
    second, out2 = run_in_thread(lambda: urza.fetch("second"))
    first.join(timeout=10)
    second.join(timeout=10)
    assert out1["result"][1] == manifest and out2["result"][0] == b"second"
    assert urza.stats()["reads_refused_stalled"] == 0


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_max_stalled_reads_is_validated(bad, tmp_path, trusted) -> None:
    with pytest.raises(ValueError, match="max_stalled_reads"):
        UrzaLibraryClient(str(tmp_path), trusted, max_stalled_reads=bad)


def test_a_read_abandoned_before_its_thread_ran_reads_nothing(store, trusted, monkeypatch) -> None:
    """The caller gives up on a read whose ``urza-io`` thread has not begun yet (a loaded
    machine): when that thread does run, it opens nothing and gives its slot back."""
    root, manifest = store
    held: list[threading.Thread] = []

    class HeldThread(threading.Thread):
        def start(self) -> None:  # started below, once its caller has given up on it
            held.append(self)

    class Threading:
        Thread = HeldThread

        def __getattr__(self, name: str) -> Any:
            return getattr(threading, name)

    monkeypatch.setattr(resilience, "threading", Threading())
    urza = UrzaLibraryClient(str(root), trusted, timeout_s=0.05, retries=0)
    flaky = urza._fs = FlakyFS(urza._fs)
    with pytest.raises(UrzaUnavailableError, match="after 1 attempt") as info:
        urza.fetch(manifest.artifact_id)
    assert isinstance(info.value.__cause__, TimeoutError)
    monkeypatch.undo()
    (thread,) = held
    assert urza.stats()["stalled_reads"] == 1  # abandoned, its thread not yet run
    threading.Thread.start(thread)
    thread.join(timeout=10)
    assert not thread.is_alive() and not flaky.reads  # the manifest was never opened
    stats = urza.stats()
    assert (stats["io_threads"], stats["stalled_reads"]) == (0, 0)


# --- the loader ---------------------------------------------------------------------------


def test_loader_original_ends_by_its_deadline(stalled, store, trusted) -> None:
    _, manifest = store
    loader = make_loader(http_client(stalled.url, trusted))
    deadline = time.monotonic() + 0.5
    with pytest.raises(UrzaUnavailableError, match=DEADLINE):
        loader.original(manifest.artifact_id, deadline=deadline)
    assert time.monotonic() < deadline + SLACK_S
    assert manifest.artifact_id not in loader.cache
    assert loader.counters["load_failures"] == 1


def test_loader_waiter_stops_at_its_deadline_while_the_load_goes_on(
    stalled, store, trusted
) -> None:
    _, manifest = store
    loader = make_loader(http_client(stalled.url, trusted))
    leader, led = run_in_thread(lambda: loader.original(manifest.artifact_id))
    stalled.wait_for_payload_requests(1)
    deadline = time.monotonic() + 0.3
    with pytest.raises(UrzaUnavailableError, match=DEADLINE):
        loader.original(manifest.artifact_id, deadline=deadline)
    assert time.monotonic() < deadline + SLACK_S
    assert leader.is_alive() and loader.counters["loads_coalesced"] == 1
    stalled.release()
    leader.join(timeout=10)
    kernel = led["result"]
    assert isinstance(kernel, GPUKernel)
    # Cached for the next call, which needs no time at all.
    assert loader.original(manifest.artifact_id, deadline=time.monotonic()) is kernel


def test_a_follower_of_a_load_refuses_a_deadline_that_is_no_instant(
    stalled, store, trusted
) -> None:
    """The client refused a NaN deadline, but a call that joined a load in progress never
    reaches the client: its wait of ``max(0, nan - now)`` timed out at once, a deadline
    "expired" that the caller never gave. A ``ValueError``, as the client's."""
    _, manifest = store
    loader = make_loader(http_client(stalled.url, trusted))
    leader, led = run_in_thread(lambda: loader.original(manifest.artifact_id))
    stalled.wait_for_payload_requests(1)
    with pytest.raises(ValueError, match="deadline must be an instant"):
        loader.original(manifest.artifact_id, deadline=float("nan"))
    assert loader.counters["load_deadlines_expired"] == 0
    stalled.release()
    leader.join(timeout=10)
    assert isinstance(led["result"], GPUKernel)


def test_loader_passes_a_deadline_only_when_there_is_one(store, trusted) -> None:
    """A client whose ``fetch`` takes no deadline still serves loads without one."""
    root, manifest = store
    real = UrzaLibraryClient(str(root), trusted, retries=0)
    calls: list[dict[str, Any]] = []

    class NoDeadlineClient:
        def fetch(self, artifact_id: str) -> tuple[bytes, Manifest]:
            calls.append({})
            return real.fetch(artifact_id)

    class RecordingClient:
        def fetch(self, artifact_id: str, **kwargs: Any) -> tuple[bytes, Manifest]:
            calls.append(kwargs)
            return real.fetch(artifact_id, **kwargs)

    assert isinstance(make_loader(NoDeadlineClient()).original(manifest.artifact_id), GPUKernel)
    deadline = time.monotonic() + 30
    make_loader(RecordingClient()).original(manifest.artifact_id, deadline=deadline)
    assert calls == [{}, {"deadline": deadline}]


# --- close --------------------------------------------------------------------------------
# ``close`` from another thread ends a fetch under way: no further attempt or backoff starts,
# and the caller stops waiting on the read in progress. The long timeouts and backoffs below
# are what a fetch would wait for if it did not stop; the joins' timeouts only guard a hang.

CLOSED = "is closed"


def test_close_during_a_backoff_starts_no_further_attempt(store, trusted) -> None:
    root, manifest = store
    # Closed while it backs off (from the injected sleep, so no timing is involved).
    urza = UrzaLibraryClient(
        str(root), trusted, retries=3, breaker_threshold=1, sleep=lambda s: urza.close()
    )
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    with pytest.raises(RuntimeError, match=CLOSED):
        urza.fetch(manifest.artifact_id)
    assert flaky.reads_of(".manifest.json") == 1  # the 2nd of 4 attempts never started
    # Cut short by close, the fetch is no outcome for the breaker, though its read failed.
    assert urza.breaker.state == "closed"


def test_close_interrupts_a_real_backoff_wait(store, trusted) -> None:
    root, manifest = store
    # Uninterrupted, the first backoff alone would take 60 s.
    urza = UrzaLibraryClient(str(root), trusted, retries=3, backoff_s=60.0, backoff_max_s=60.0)
    flaky = urza._fs = FlakyFS(urza._fs)
    flaky.down = True
    fetch, out = run_in_thread(lambda: urza.fetch(manifest.artifact_id))
    end = time.monotonic() + 10
    while flaky.reads_of(".manifest.json") < 1 and time.monotonic() < end:
        time.sleep(0.005)
    assert flaky.reads_of(".manifest.json") == 1
    urza.close()
    fetch.join(timeout=10)
    assert not fetch.is_alive()
    assert isinstance(out.get("error"), RuntimeError) and CLOSED in str(out["error"])
    assert flaky.reads_of(".manifest.json") == 1


def test_close_ends_the_wait_on_a_stalled_read(stalled, store, trusted) -> None:
    _, manifest = store
    # Uninterrupted, the stalled payload read would hold the fetch for its 60 s timeout, and
    # then retry.
    urza = http_client(stalled.url, trusted, timeout_s=60.0, retries=3)
    fetch, out = run_in_thread(lambda: urza.fetch(manifest.artifact_id))
    stalled.wait_for_payload_requests(1)
    urza.close()
    fetch.join(timeout=10)
    assert not fetch.is_alive()  # returned while the store still stalls (not yet released)
    assert isinstance(out.get("error"), RuntimeError) and CLOSED in str(out["error"])
    stats = urza.stats()
    assert stats["reads"] == 2 and stats["reads_abandoned"] == 1  # manifest, one payload read
    assert stalled.payload_requests == 1 and urza.breaker.state == "closed"
    with pytest.raises(RuntimeError, match=CLOSED):
        urza.fetch(manifest.artifact_id)


def test_a_load_stopped_by_close_is_an_ending_not_a_failure(store, trusted, caplog) -> None:
    root, manifest = store
    # The client is closed while the load backs off after a failed read.
    urza = UrzaLibraryClient(str(root), trusted, retries=3, sleep=lambda s: urza.close())
    urza._fs = FlakyFS(urza._fs)
    urza._fs.down = True
    loader = make_loader(urza)
    with caplog.at_level("INFO", logger="kasmina.urza.loader"):
        with pytest.raises(RuntimeError, match=CLOSED):
            loader.load(manifest.artifact_id)
    records = [r for r in caplog.records if r.name == "kasmina.urza.loader"]
    assert [r.levelname for r in records] == ["INFO"] and "was closed" in records[0].message
    assert loader.counters["load_failures"] == 0


class _Missing:
    """A store client whose every fetch fails (an artifact id the store does not hold)."""

    def fetch(self, artifact_id: str, deadline: float | None = None):
        raise FileNotFoundError(f"no artifact {artifact_id}")


def test_failed_loads_are_each_counted_and_logged_rarely(caplog) -> None:
    """A controller that keeps asking for an artifact the store lacks: every failure is
    counted and reported, and logged at ERROR for the first and every 100th only."""
    caplog.set_level(logging.DEBUG, logger="kasmina.urza.loader")
    loader = make_loader(_Missing())
    for _ in range(150):
        with pytest.raises(FileNotFoundError):
            loader.original("gone")
    failed = [r for r in caplog.records if "could not load kernel" in r.getMessage()]
    assert len(failed) == 150 and loader.counters["load_failures"] == 150
    assert [i for i, r in enumerate(failed, 1) if r.levelno >= logging.ERROR] == [1, 100]


def test_a_read_whose_thread_cannot_start_gives_its_slot_back(
    tmp_path: Path,
    publisher: PublisherKey,
    trusted: TrustedPublishers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process cannot start the read's thread (out of threads): that attempt is a
    transport failure, retried, and the fetch ends in ``UrzaUnavailableError``; no read ran, so
    no I/O thread is counted, and with ``max_stalled_reads=1`` the next fetch still gets the one
    slot at once and reads the artifact."""

    class Unstartable(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    class Threading:
        Thread = Unstartable

        def __getattr__(self, name: str) -> Any:
            return getattr(threading, name)

    payload = bytes(range(256)) * 4
    store = tmp_path / "store"
    publish_payload(payload, str(store), "bp", publisher, "a1")
    monkeypatch.setattr(resilience, "threading", Threading())
    urza = UrzaLibraryClient(
        str(store), trusted, timeout_s=2.0, retries=1, backoff_s=0.0, max_stalled_reads=1
    )
    flaky = urza._fs = FlakyFS(urza._fs)
    with pytest.raises(UrzaUnavailableError, match="after 2 attempts") as info:
        urza.fetch("a1")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "can't start new thread" in str(info.value.__cause__)
    assert not flaky.reads  # nothing was opened
    stats = urza.stats()
    assert (stats["io_threads"], stats["stalled_reads"]) == (0, 0)

    monkeypatch.undo()
    fetched, manifest = urza.fetch("a1")
    assert fetched == payload and manifest.artifact_id == "a1"
    stats = urza.stats()
    assert (stats["io_threads"], stats["stalled_reads"]) == (0, 0)
