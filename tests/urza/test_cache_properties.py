"""GPUKernelCache as a state machine, against a plain-Python model of docs/design.md §6.

The model holds what the documents promise: an LRU bounded in bytes and in kernels (pinned ones
counted), sizes remembered at put;
only unpinned kernels are in LRU order (a pinned one leaves it, and re-enters it as the most
recently used when its last pin goes); a put evicts least recently used unpinned kernels until
the new one fits in both, and a kernel larger than the cache, or one whose room is held by pins, is
served uncached (``False``) and evicts nothing; a pinned id cannot be replaced (``ValueError``);
``evict`` refuses a pinned or absent kernel (``False``); pins are counted (one unpin per pin)
and ``pin`` of an absent id or ``unpin`` of an unpinned one raises ``KeyError``; ``clear``
evicts every unpinned kernel; hits, misses, evictions and uncached puts are counted exactly;
every removed kernel (evicted or replaced) is marked ``was_evicted`` and released exactly once,
and no cached kernel is ever released.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kasmina.urza.cache import GPUKernelCache

MB = 1024 * 1024
PICKS = st.tuples(st.integers(0, 3), st.integers(0, 5))  # see ``CacheMachine._pick``
# Mostly a few kernels' worth of a cache of up to 300 bytes; now and then one larger than any
# cache here, or a negative size (refused).
SIZES = st.tuples(st.integers(0, 9), st.integers(0, 50), st.integers(301, 1000)).map(
    lambda t: t[1] if t[0] < 8 else t[2] if t[0] == 8 else -1
)

SETTINGS = settings(  # about a second: the cache is cheap, so more runs than the table's
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


class FakeKernel:
    """A kernel of a settable size that counts its releases."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.releases = 0

    def get_memory_size(self) -> int:
        return self.size

    def release_gpu_memory(self) -> None:
        self.releases += 1


class CacheModel:
    """The cache as the documents describe it."""

    def __init__(self, max_bytes: int, max_kernels: int) -> None:
        self.max_bytes = max_bytes
        self.max_kernels = max_kernels
        self.entries: dict[str, tuple[FakeKernel, int]] = {}
        self.lru: list[str] = []  # unpinned ids, least recently used first
        self.pins: dict[str, int] = {}
        self.removed: list[FakeKernel] = []
        self.hits = self.misses = self.evictions = self.uncached = 0

    def used(self) -> int:
        return sum(size for _, size in self.entries.values())

    def pinned_bytes(self, but: str | None = None) -> int:
        return sum(self.entries[i][1] for i in self.pins if i != but)

    def get(self, kid: str) -> FakeKernel | None:
        if kid not in self.entries:
            self.misses += 1
            return None
        self.hits += 1
        if kid in self.lru:
            self.lru.remove(kid)
            self.lru.append(kid)
        return self.entries[kid][0]

    def put(self, kid: str, kernel: FakeKernel) -> bool:
        size = kernel.size
        pinned = kid in self.pins
        old = self.entries.get(kid)
        if old is not None and old[0] is not kernel and pinned:
            raise ValueError("pinned")
        # Room there is once every other unpinned kernel is gone: what pins leave.
        others_pinned = len([i for i in self.pins if i != kid])
        if size > self.max_bytes - self.pinned_bytes(but=kid) or others_pinned >= self.max_kernels:
            self.uncached += 1
            return False
        if old is not None:
            del self.entries[kid]
            if kid in self.lru:
                self.lru.remove(kid)
            if old[0] is not kernel:
                self.removed.append(old[0])  # replaced: released, not counted as an eviction
        while self.used() + size > self.max_bytes or len(self.entries) >= self.max_kernels:
            victim = self.lru.pop(0)
            self.removed.append(self.entries.pop(victim)[0])
            self.evictions += 1
        self.entries[kid] = (kernel, size)
        if not pinned:
            self.lru.append(kid)
        return True

    def evict(self, kid: str) -> bool:
        if kid not in self.entries or kid in self.pins:
            return False
        self.removed.append(self.entries.pop(kid)[0])
        self.lru.remove(kid)
        self.evictions += 1
        return True

    def pin(self, kid: str) -> FakeKernel:
        if kid not in self.entries:
            raise KeyError(kid)
        if kid not in self.pins:
            self.lru.remove(kid)
        self.pins[kid] = self.pins.get(kid, 0) + 1
        return self.entries[kid][0]

    def unpin(self, kid: str) -> None:
        if kid not in self.pins:
            raise KeyError(kid)
        self.pins[kid] -= 1
        if not self.pins[kid]:
            del self.pins[kid]
            self.lru.append(kid)  # most recently used: it was in use until now

    def clear(self) -> None:
        for kid in list(self.lru):
            self.evict(kid)


class CacheMachine(RuleBasedStateMachine):
    @initialize(
        budget=st.integers(0, 300),
        kernels=st.integers(1, 7),  # 6 and 7: the six ids never fill it
        first=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 50)), max_size=8),
    )
    def make(self, budget: int, kernels: int, first: list[tuple[int, int]]) -> None:
        """A cache of ``budget`` bytes and ``kernels`` kernels and a few kernels put in it (so
        that every run has a cache to work on, whichever rules it leaves out)."""
        self.cache = GPUKernelCache(cache_size_mb=budget / MB, max_kernels=kernels)
        assert self.cache.max_bytes == budget  # exactly ``budget`` bytes
        self.model = CacheModel(budget, kernels)
        self.made: list[FakeKernel] = []
        for which, size in first:
            self._put_new("abcdef"[which], size)

    def _books(self) -> tuple[Any, ...]:
        return (
            self.cache.stats(),
            {k: self.cache.is_pinned(k) for k in "abcdef"},
            [k.releases for k in self.made],
            [self.cache.was_evicted(k) for k in self.made],
        )

    # -- rules --------------------------------------------------------------------------
    def _pick(self, spec: tuple[int, int], pool: Any) -> str:
        """Mostly an id from ``pool`` (the cached or the pinned ones), else any id."""
        prefer, which = spec
        ids = sorted(pool)
        if prefer < 3 and ids:
            return ids[which % len(ids)]
        return "abcdef"[which]

    @rule(kid=PICKS)
    def get(self, kid: tuple[int, int]) -> None:
        key = self._pick(kid, self.model.entries)
        assert self.cache.get(key) is self.model.get(key)

    @rule(
        put=st.tuples(
            st.sampled_from(["new", "pressure", "again"]),
            PICKS,
            SIZES,
            st.integers(1, 40),
        )
    )
    def put(self, put: tuple[str, tuple[int, int], int, int]) -> None:
        """A new kernel under any id (a negative size is refused); a new one just larger than
        the free room, by at most the size of the least recently used unpinned kernel (that
        one must go, and usually no other; or it is served uncached when pins hold the room);
        or the cached kernel put again under its id (pinned or not), at a new size when
        ``size`` is even."""
        how, pick, size, over = put
        if how == "new":
            self._put_new("abcdef"[pick[1]], size)
        elif how == "pressure":
            free = self.model.max_bytes - self.model.used()
            lru = self.model.lru
            head = self.model.entries[lru[0]][1] if lru else over
            self._put_new("abcdef"[pick[1]], free + max(1, min(over, head)))
        else:
            key = self._pick(pick, self.model.entries)
            entry = self.model.entries.get(key)
            if entry is None:
                return
            if size >= 0 and size % 2 == 0:
                entry[0].size = size
            assert self.cache.put(key, entry[0]) is self.model.put(key, entry[0])

    def _put_new(self, key: str, size: int) -> None:
        kernel = FakeKernel(size)
        self.made.append(kernel)
        try:
            expected = self.model.put(key, kernel) if size >= 0 else None
        except ValueError:  # a pinned id, another kernel
            expected = None
        if expected is None:
            before = self._books()
            with pytest.raises(ValueError, match="negative" if size < 0 else "pinned"):
                self.cache.put(key, kernel)
            assert self._books() == before
        else:
            assert self.cache.put(key, kernel) is expected

    @rule(kid=PICKS)
    def evict(self, kid: tuple[int, int]) -> None:
        key = self._pick(kid, self.model.entries if kid[0] < 2 else ())
        assert self.cache.evict(key) is self.model.evict(key)

    @rule(kid=PICKS)
    def pin(self, kid: tuple[int, int]) -> None:
        key = self._pick(kid, self.model.entries)
        if key not in self.model.entries:
            before = self._books()
            with pytest.raises(KeyError):
                self.cache.pin(key)
            assert self._books() == before
            return
        assert self.cache.pin(key) is self.model.pin(key)

    @rule(kid=PICKS)
    def unpin(self, kid: tuple[int, int]) -> None:
        key = self._pick(kid, self.model.pins)
        if key in self.model.pins:
            self.cache.unpin(key)
            self.model.unpin(key)
            return
        before = self._books()
        with pytest.raises(KeyError):  # one unpin per pin: an unpinned or absent id refuses
            self.cache.unpin(key)
        assert self._books() == before

    @precondition(lambda self: hasattr(self, "model") and len(self.model.lru) >= 3)
    @rule()
    def clear(self) -> None:
        """Empties the cache but for its pinned kernels (only once there is something to
        clear: a rule without arguments is drawn often)."""
        self.cache.clear()
        self.model.clear()

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def cache_matches_the_model(self) -> None:
        if not hasattr(self, "model"):
            return
        cache, model = self.cache, self.model
        assert {k for k in "abcdef" if k in cache} == set(model.entries)
        assert len(cache) == len(model.entries)
        assert cache.bytes_used == model.used() <= model.max_bytes  # the budget always holds
        assert len(cache) <= model.max_kernels
        # The LRU order itself, the one white-box check (black-box, it shows only later, in
        # which kernels a put evicts: checked by the line above after every put).
        assert list(cache._lru) == model.lru
        for kid in "abcdef":
            assert cache.is_pinned(kid) == (kid in model.pins)
        lookups = model.hits + model.misses
        assert cache.stats() == {
            "hits": model.hits,
            "misses": model.misses,
            "evictions": model.evictions,
            "uncached": model.uncached,
            "hit_rate": model.hits / lookups if lookups else 0.0,
            "entries": len(model.entries),
            "pinned": len(model.pins),
            "bytes_used": model.used(),
            "max_bytes": model.max_bytes,
            "max_kernels": model.max_kernels,
        }
        cached = {id(kernel) for kernel, _ in model.entries.values()}
        removed = {id(kernel) for kernel in model.removed}
        for kernel in self.made:  # removed: marked and released once; cached or never: neither
            gone = id(kernel) in removed
            assert kernel.releases == int(gone), "released twice, or a live kernel released"
            assert cache.was_evicted(kernel) == gone
            assert not (gone and id(kernel) in cached)


def test_cache_matches_the_model() -> None:
    run_state_machine_as_test(CacheMachine, settings=SETTINGS)
