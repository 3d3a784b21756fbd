"""Kernel loads in a ``fork()``ed child (a DataLoader or Pool worker under the ``fork`` start
method) while a thread of its parent, a fetch worker, was loading one: the child has only the
thread that forked, so what that worker held at the fork must not hold the child's loads up."""

from __future__ import annotations

import os
import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kasmina.urza import fx_sources
from kasmina.urza import kernel as kernel_module
from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.keys import PublisherKey, TrustedPublishers
from kasmina.urza.loader import KernelLoader
from kasmina.urza.publish import publish_artifact
from kasmina.utils.telemetry import TelemetryReporter
from tests.crash import run_bounded_in_child
from tests.urza.test_deadlines import HeldManifestFS, run_in_thread

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() children only")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, publisher: PublisherKey) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("store")
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))
    manifest = publish_artifact(module, (torch.randn(2, 4),), str(path), "mlp", publisher)
    return path, manifest.artifact_id


@contextmanager
def stopped_inside(
    target: Any,
    name: str,
    run: Callable[[], object],
    holding: Callable[[bool], None] = lambda _: None,
) -> Iterator[None]:
    """``run`` on a thread of its own (a fetch worker), stopped in ``target.name`` until the
    block ends (``holding(True)`` as it stops, ``holding(False)`` as it goes on); other
    threads, and a forked child, call through."""
    real, there, go = getattr(target, name), threading.Event(), threading.Event()

    def stopping(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is worker:
            holding(True)
            there.set()
            go.wait(60)
            holding(False)
        return real(*args, **kwargs)

    setattr(target, name, stopping)
    worker = threading.Thread(target=run, name="kasmina-fetch")
    worker.start()
    try:
        assert there.wait(60)
        yield
    finally:
        go.set()
        worker.join(60)
        setattr(target, name, real)


def _in_child(action: Callable[[], None]) -> Callable[[], None]:
    def child() -> None:
        torch.set_num_threads(1)  # no OpenMP pool of the parent's in the child
        action()

    return child


def test_a_forked_child_unpickles_a_kernel_while_a_fetch_worker_was_loading_one(
    store: tuple[Path, str], trusted: TrustedPublishers
) -> None:
    """A load holds the process's load lock, and torch.export's one deserializer slot, for its
    whole length: a worker forked meanwhile inherited both taken by a thread it does not have,
    and its first kernel load (a model holding a seed, unpickled) blocked for good on the lock,
    or was refused for the slot. Both are free in the child now; the parent's load completes."""
    path, artifact_id = store
    payload, manifest = UrzaLibraryClient(str(path), trusted).fetch(artifact_id)
    pickled = pickle.dumps(GPUKernel.from_binary(payload, manifest, "cpu"))
    serde = torch._export.serde.serialize
    loaded: list[GPUKernel] = []

    def deserialising(inside: bool) -> None:  # the slot, as torch.export.load holds it
        serde._CURRENT_DESERIALIZER = object() if inside else None

    def child() -> None:
        kernel = pickle.loads(pickled)
        assert kernel(torch.ones(2, 4)).shape == (2, 4)

    load = lambda: loaded.append(pickle.loads(pickled))  # noqa: E731
    with stopped_inside(kernel_module, "_deserialise", load, holding=deserialising):
        assert fx_sources.BUILD_LOCK.locked() and serde._CURRENT_DESERIALIZER is not None
        assert run_bounded_in_child(_in_child(child)) == 0  # was HUNG
    assert len(loaded) == 1 and not fx_sources.BUILD_LOCK.locked()


def test_a_forked_child_loads_a_kernel_a_fetch_worker_of_its_parent_was_loading(
    store: tuple[Path, str], trusted: TrustedPublishers
) -> None:
    """The loader shares one load of a kernel among its callers: a worker forked while a fetch
    worker led one found that load in flight, led by a thread it does not have, and waited on
    it for good (a call without a deadline). The child forgets the loads in flight and loads."""
    path, artifact_id = store
    client = UrzaLibraryClient(str(path), trusted)
    cache = GPUKernelCache(64 << 20)
    loader = KernelLoader(client, cache, torch.device("cpu"), TelemetryReporter())

    def child() -> None:
        kernel = loader.original(artifact_id)
        assert kernel(torch.ones(2, 4)).shape == (2, 4)

    with stopped_inside(client, "fetch", lambda: loader.original(artifact_id)):
        assert run_bounded_in_child(_in_child(child)) == 0  # was HUNG
    assert loader.cached(artifact_id) is not None


def test_a_forked_child_fetches_what_a_fetch_worker_of_its_parent_was_reading(
    store: tuple[Path, str], trusted: TrustedPublishers
) -> None:
    """Concurrent fetches of one artifact share one read: a worker forked while a fetch worker
    of its parent led one found that fetch in flight, led by a thread it does not have, and
    waited on it for good (no deadline); and that fetch's store read, counted against
    ``max_stalled_reads``, never freed its slot there. The child forgets both and fetches."""
    path, artifact_id = store
    client = UrzaLibraryClient(str(path), trusted, max_stalled_reads=1)
    fs = client._fs = HeldManifestFS(client._fs)  # the parent's read stops in its manifest
    worker, fetched = run_in_thread(lambda: client.fetch(artifact_id))
    assert fs.held.wait(10) and client.stats()["io_threads"] == 1

    def child() -> None:
        fs.release.set()  # the child's own read goes through
        assert client.stats()["io_threads"] == 0
        payload, manifest = client.fetch(artifact_id)
        assert manifest.artifact_id == artifact_id and payload
        assert client.stats()["fetches"] == 2  # the parent's, counted before the fork, and its own

    try:
        assert run_bounded_in_child(_in_child(child), timeout_s=20) == 0  # was HUNG
    finally:
        fs.release.set()
        worker.join(10)
    assert "result" in fetched and client.stats()["io_threads"] == 0
