"""Kernel loading costs (docs/design.md §6, §8).

- cold load of a ~1 MB artifact: fetch from a local store + verify (signature, size, SHA-256) +
  deserialise + move to the device. docs/design.md §8 sets no number for it; it is reported so
  that a regression shows.
- warm cache hit: ``GPUKernelCache.get`` of a cached kernel, target <= 2 us.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.urza.cache import GPUKernelCache
from kasmina.urza.client import UrzaLibraryClient
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    keyring = Keyring({"pub": generate_key()})
    root = tmp_path_factory.mktemp("urza")
    module = nn.Sequential(nn.Linear(512, 512), nn.GELU())  # 1 MiB of fp32 weights
    manifest = publish_artifact(module, (torch.randn(4, 512),), str(root), "mlp", keyring, "pub")
    return UrzaLibraryClient(str(root), keyring), manifest


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def test_cold_load_1mb(benchmark, store) -> None:
    client, manifest = store

    def cold_load() -> GPUKernel:
        payload, verified = client.fetch(manifest.artifact_id)
        kernel = GPUKernel.from_binary(payload, verified, DEVICE)
        _sync()
        return kernel

    kernel = benchmark.pedantic(cold_load, rounds=10, warmup_rounds=1)
    benchmark.extra_info["target"] = (
        f"no docs/design.md §8 number; payload {manifest.size / 1e6:.2f} MB onto {DEVICE.type}"
    )
    benchmark.extra_info["payload_bytes"] = manifest.size
    assert kernel.get_memory_size() >= 1 << 20


def test_warm_cache_hit(benchmark, store) -> None:
    client, manifest = store
    payload, verified = client.fetch(manifest.artifact_id)
    cache = GPUKernelCache(cache_size_mb=64)
    cache.put(manifest.artifact_id, GPUKernel.from_binary(payload, verified, DEVICE))
    for i in range(15):  # a realistically populated cache: other kernels around the hit
        cache.put(f"other-{i}", GPUKernel.from_binary(payload, verified, DEVICE))
    kernel = benchmark(cache.get, manifest.artifact_id)
    benchmark.extra_info["target"] = "cache hit <= 2 us"
    assert kernel is not None


def test_cache_put_among_pinned_kernels(benchmark) -> None:
    """A put that evicts while 10,000 pinned kernels sit in the cache: O(1), so it costs about
    what a put into an empty cache does."""

    class Sized:
        def get_memory_size(self) -> int:
            return 1024

        def release_gpu_memory(self) -> None:
            return None

    cache = GPUKernelCache(cache_size_mb=10_001 * 1024 / (1 << 20))
    for i in range(10_000):
        cache.put(f"pinned-{i}", Sized())
        cache.pin(f"pinned-{i}")
    counter = iter(range(1 << 40))
    benchmark(lambda: cache.put(f"k{next(counter)}", Sized()))
    benchmark.extra_info["target"] = "O(1): independent of the number of pinned kernels"
    assert cache.stats()["pinned"] == 10_000 and cache.bytes_used <= cache.max_bytes
