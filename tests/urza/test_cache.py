"""GPUKernelCache: LRU order, byte and kernel bounds, pinning, oversize kernels, thread safety."""

from __future__ import annotations

import gc
import logging
import math
import random
import sys
import threading

import pytest

from kasmina.urza.cache import GPUKernelCache

MB = 1024 * 1024


class FakeKernel:
    """Reports a fixed size and counts releases (a kernel released twice is a bug)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.releases = 0

    def get_memory_size(self) -> int:
        return 0 if self.releases else self.size

    def release_gpu_memory(self) -> None:
        self.releases += 1


def test_lru_order_and_release_on_eviction() -> None:
    cache = GPUKernelCache(cache_size_mb=3)
    kernels = {name: FakeKernel(MB) for name in "abcd"}
    for name in "abc":
        assert cache.put(name, kernels[name])
    assert cache.get("a") is kernels["a"]  # a is now most recently used
    assert cache.put("d", kernels["d"])
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert kernels["b"].releases == 1 and all(kernels[k].releases == 0 for k in "acd")
    cache.put("e", FakeKernel(2 * MB))  # evicts c then a (least recent first)
    assert "c" not in cache and "a" not in cache and "d" in cache and "e" in cache
    assert cache.stats()["evictions"] == 3 and cache.bytes_used == 3 * MB


def test_byte_bound_holds_for_mixed_sizes() -> None:
    rng = random.Random(0)
    cache = GPUKernelCache(cache_size_mb=1)
    live: dict[str, FakeKernel] = {}
    for i in range(500):
        kernel = FakeKernel(rng.randint(1, MB // 3))
        cache.put(f"k{i}", kernel)
        live[f"k{i}"] = kernel
        cached = [k for k in live if k in cache]
        assert cache.bytes_used == sum(live[k].size for k in cached) <= cache.max_bytes
        assert len(cache) == len(cached)
    assert all(kernel.releases == (name not in cache) for name, kernel in live.items())


def test_hits_misses_and_stats() -> None:
    cache = GPUKernelCache(cache_size_mb=1)
    assert cache.get("x") is None
    cache.put("x", FakeKernel(10))
    assert cache.get("x") is not None and cache.get("x") is not None
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["bytes_used"]) == (2, 1, 1, 10)
    assert stats["hit_rate"] == pytest.approx(2 / 3)
    assert stats["max_bytes"] == MB


def test_pinned_kernels_are_never_evicted() -> None:
    cache = GPUKernelCache(cache_size_mb=2)
    a, b, c = FakeKernel(MB), FakeKernel(MB), FakeKernel(MB)
    cache.put("a", a)
    cache.put("b", b)
    cache.pin("a")
    cache.pin("a")  # two seeds share it
    assert cache.put("c", c)  # evicts b, the only unpinned one, although a is older
    assert "a" in cache and "b" not in cache and a.releases == 0
    cache.pin("c")
    d = FakeKernel(MB)
    assert not cache.put("d", d)  # everything pinned: served uncached, nothing evicted
    assert "a" in cache and "c" in cache and "d" not in cache and d.releases == 0
    assert not cache.evict("a") and "a" in cache
    cache.unpin("a")
    assert cache.is_pinned("a") and not cache.evict("a")
    cache.unpin("a")
    assert not cache.is_pinned("a") and cache.evict("a") and a.releases == 1
    with pytest.raises(KeyError):
        cache.pin("absent")
    with pytest.raises(KeyError):
        cache.unpin("a")
    cache.clear()
    assert "c" in cache and len(cache) == 1  # clear keeps pinned kernels
    assert cache.stats()["pinned"] == 1


def test_oversize_kernel_is_served_uncached_with_a_warning(caplog) -> None:
    cache = GPUKernelCache(cache_size_mb=1)
    small = FakeKernel(MB // 2)
    cache.put("small", small)
    big = FakeKernel(MB + 1)
    with caplog.at_level(logging.WARNING, logger="kasmina.urza.cache"):
        assert cache.put("big", big) is False
    assert "served uncached" in caplog.text and "larger than the cache" in caplog.text
    assert "big" not in cache and "small" in cache
    assert big.releases == 0 and small.releases == 0
    assert cache.stats()["uncached"] == 1 and cache.bytes_used == MB // 2


def test_tiny_kernels_are_bounded_in_number_too() -> None:
    """Each cached kernel also keeps its program on the host (about 100 KB for a tiny one),
    which the byte budget does not count: a run that germinated ever new artifacts of a few
    bytes each grew the cache by one entry per artifact, up to millions of them under the
    default 512 MB. Past ``max_kernels`` entries (1,024 by default) the LRU evicts as well."""
    cache = GPUKernelCache(cache_size_mb=512)
    kernels = [FakeKernel(88) for _ in range(1100)]
    for i, kernel in enumerate(kernels):
        assert cache.put(f"k{i}", kernel)
    assert len(cache) <= 1024 and cache.bytes_used == 88 * len(cache)
    assert all(kernel.releases == (f"k{i}" not in cache) for i, kernel in enumerate(kernels))
    assert f"k{len(kernels) - 1}" in cache


def test_the_kernel_bound_counts_pins_and_evicts_least_recent_first() -> None:
    cache = GPUKernelCache(cache_size_mb=1, max_kernels=3)
    kernels = {name: FakeKernel(10) for name in "abcdef"}
    for name in "abc":
        assert cache.put(name, kernels[name])
    assert cache.get("a") is kernels["a"]
    assert cache.put("d", kernels["d"])  # b, the least recently used, goes
    assert {k for k in "abcd" if k in cache} == {"a", "c", "d"} and kernels["b"].releases == 1
    assert cache.put("d", kernels["d"]) and len(cache) == 3  # a put again evicts nothing
    for name in "acd":
        cache.pin(name)
    assert cache.put("a", kernels["a"]) and len(cache) == 3  # its own entry: it adds none
    assert not cache.put("e", kernels["e"])  # every entry pinned: served uncached
    assert "e" not in cache and kernels["e"].releases == 0 and cache.stats()["uncached"] == 1
    cache.unpin("c")
    assert cache.put("f", kernels["f"]) and "c" not in cache and kernels["c"].releases == 1
    assert len(cache) == 3 and cache.stats()["max_kernels"] == 3
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="max_kernels"):
            GPUKernelCache(cache_size_mb=1, max_kernels=bad)


def test_replacing_and_evicting() -> None:
    cache = GPUKernelCache(cache_size_mb=1)
    old, new = FakeKernel(100), FakeKernel(200)
    cache.put("k", old)
    assert cache.put("k", old) and cache.bytes_used == 100 and old.releases == 0
    cache.put("k", new)
    assert old.releases == 1 and cache.get("k") is new and cache.bytes_used == 200
    cache.pin("k")
    with pytest.raises(ValueError, match="pinned"):
        cache.put("k", FakeKernel(1))
    cache.unpin("k")
    assert cache.evict("k") and new.releases == 1 and cache.bytes_used == 0
    assert not cache.evict("k")
    for bad in (-1, math.inf, math.nan, True, 1e303):
        with pytest.raises(ValueError, match="cache_size_mb"):
            GPUKernelCache(cache_size_mb=bad)


def test_concurrent_get_put_evict_keeps_the_books_straight() -> None:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so unlocked races would show
    try:
        _hammer()
    finally:
        sys.setswitchinterval(interval)


def _hammer() -> None:
    cache = GPUKernelCache(cache_size_mb=1)
    made: list[FakeKernel] = []
    made_lock = threading.Lock()
    gets = [0] * 8
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        rng = random.Random(index)
        try:
            for _ in range(1500):
                key = f"k{rng.randrange(40)}"
                op = rng.random()
                if op < 0.5:
                    cache.get(key)
                    gets[index] += 1
                elif op < 0.9:
                    kernel = FakeKernel(rng.randint(1, MB // 8))
                    with made_lock:
                        made.append(kernel)
                    cache.put(key, kernel)
                else:
                    cache.evict(key)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == sum(gets)
    cached = [cache.get(f"k{i}") for i in range(40)]
    cached = [k for k in cached if k is not None]
    assert cache.bytes_used == sum(k.size for k in cached) <= cache.max_bytes
    assert all(k.releases == 0 for k in cached)
    assert all(k.releases <= 1 for k in made)
    assert sum(k.releases for k in made) + len(cached) == len(made)


class _CountingDict(dict):
    """A dict that counts full walks over it (a put must never make one: O(1))."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()

    def items(self):
        type(self).walks += 1
        return super().items()

    def keys(self):
        type(self).walks += 1
        return super().keys()

    def values(self):
        type(self).walks += 1
        return super().values()


def test_put_and_evict_never_walk_the_cache_and_pins_keep_the_books() -> None:
    cache = GPUKernelCache(cache_size_mb=1)
    pinned = [FakeKernel(1024) for _ in range(200)]
    for i, kernel in enumerate(pinned):
        cache.put(f"p{i}", kernel)
        cache.pin(f"p{i}")
    cache._entries = _CountingDict(cache._entries)
    free = MB - 200 * 1024
    for i in range(50):  # each put evicts the previous one: only unpinned kernels are victims
        assert cache.put(f"u{i}", FakeKernel(free))
    assert _CountingDict.walks == 0
    assert all(k.releases == 0 for k in pinned) and cache.bytes_used == MB
    assert not cache.put("big", FakeKernel(free + 1))  # the rest of the room is held by pins
    assert cache.evict("u49") and cache.bytes_used == 200 * 1024
    # Unpinned, a kernel becomes evictable again, as the most recently used one.
    cache.put("a", FakeKernel(free // 2))
    cache.unpin("p0")
    assert cache.put("b", FakeKernel(free - free // 2 + 1024))  # evicts a (older), keeps p0
    assert "a" not in cache and "p0" in cache and pinned[0].releases == 0
    assert cache.put("c", FakeKernel(free // 2))  # 1024 bytes short: p0, older than b, goes
    assert "p0" not in cache and pinned[0].releases == 1
    assert cache.bytes_used <= cache.max_bytes and cache.stats()["pinned"] == 199


def test_a_kernel_belongs_to_one_cache_entry() -> None:
    """A kernel in two caches (or under two ids) was released by one's eviction while the
    other still held it, pinned even; a put of a kernel another entry holds is refused now,
    with nothing changed, and so is one another cache removed (released)."""
    first, second = GPUKernelCache(cache_size_mb=1), GPUKernelCache(cache_size_mb=1)
    shared, mine = FakeKernel(100), FakeKernel(100)
    assert first.put("k", shared) and second.put("k", mine)
    second.pin("k")
    for cache, kid in ((second, "k"), (second, "j"), (first, "j")):
        with pytest.raises(ValueError, match="belongs to one cache"):
            cache.put(kid, shared)
    assert second.get("k") is mine and "j" not in first and "j" not in second
    assert first.bytes_used == second.bytes_used == 100 and first.put("k", shared)  # again: ok
    assert first.evict("k") and shared.releases == 1 and mine.releases == 0
    with pytest.raises(ValueError, match="evicted from another kernel cache"):
        second.put("j", shared)
    assert first.put("k", shared)  # its own cache may take it back (``was_evicted`` stays)
    del first, cache
    gc.collect()
    second.unpin("k")
    assert second.put("k", shared) and mine.releases == 1  # its cache gone: free to take


def test_eviction_is_marked_before_the_release_and_pin_returns_the_kernel() -> None:
    cache = GPUKernelCache(cache_size_mb=1)
    seen: list[bool] = []

    class Watched(FakeKernel):
        def release_gpu_memory(self) -> None:
            seen.append(cache.was_evicted(self))  # a copier can already tell, mid-release
            super().release_gpu_memory()

    a, b = Watched(MB), Watched(MB)
    cache.put("a", a)
    assert cache.pin("a") is a and not cache.evict("a") and not cache.was_evicted(a)
    cache.unpin("a")
    assert cache.evict("a") and cache.was_evicted(a) and seen == [True]
    cache.put("b", b)
    cache.put("c", FakeKernel(MB))  # b evicted by a put
    assert cache.was_evicted(b) and seen == [True, True]


def test_a_put_under_a_cached_id_counts_only_unpinned_room_other_than_its_own() -> None:
    """The room a put may free is the unpinned bytes less its own entry's (replaced, not
    evicted): a larger replacement whose room pins hold is served uncached and leaves the old
    entry and the books as they were; a pinned kernel put again at a larger size evicts the
    unpinned ones it needs to, to the byte."""
    cache = GPUKernelCache(cache_size_mb=2)
    pinned, old = FakeKernel(MB), FakeKernel(MB)
    cache.put("p", pinned)
    cache.pin("p")
    cache.put("b", old)
    bigger = FakeKernel(2 * MB)
    assert cache.put("b", bigger) is False  # only b's own MB is unpinned: no room for 2 MB
    assert cache.get("b") is old and old.releases == 0 and bigger.releases == 0
    assert cache.bytes_used == 2 * MB and cache.stats()["uncached"] == 1
    cache.unpin("p")

    cache = GPUKernelCache(cache_size_mb=2)
    grown, other = FakeKernel(MB), FakeKernel(MB)
    cache.put("a", grown)
    cache.pin("a")
    cache.put("o", other)
    grown.size = 2 * MB  # the same kernel, now reporting all of the cache
    assert cache.put("a", grown)  # exactly the room of o, the one unpinned kernel
    assert "o" not in cache and other.releases == 1 and grown.releases == 0
    assert cache.is_pinned("a") and cache.bytes_used == 2 * MB
    assert not cache.put("c", FakeKernel(1))  # the pinned bytes grew with it: nothing is free
    cache.unpin("a")  # and shrink by all of it: the whole cache may be evicted for a put
    assert cache.put("c", FakeKernel(2 * MB)) and "a" not in cache and grown.releases == 1
