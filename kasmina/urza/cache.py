"""The device-resident kernel cache: an LRU bounded in bytes and in kernels (docs/design.md §6).

Sizes come from ``GPUKernel.get_memory_size()`` when a kernel is put in and are remembered, so
the byte account cannot drift. Kernels attached to live seeds are pinned (a count, so several
seeds may share one) and are never evicted; evicted kernels have their device memory released.
Releasing happens after the lock is dropped, so a slow release never stalls a concurrent ``get``.
Only unpinned kernels are kept in LRU order, so get, put, pin and unpin are O(1) (plus O(1) per
kernel a put evicts), however many kernels are pinned.

Why a bound in kernels as well: the byte account counts a kernel's tensors only, and each cached
kernel also holds its program on the host (its ``GraphModule`` and ``ExportedProgram``: about
100 KB for a two-layer kernel whose weights are 88 bytes). A run that germinates ever new tiny
artifacts filled a 512 MB budget only after millions of them, growing host memory by hundreds of
GB on the way; ``max_kernels`` entries (pinned ones included) bound that side.

Why ``was_evicted``: a kernel's memory is released after the lock is dropped, so for a moment an
evicted kernel is half emptied but not yet marked ``released``. The cache remembers (weakly)
every kernel it removed, under the lock and before releasing it, so whoever copies a kernel it
got from the cache can tell afterwards whether the copy may have read released memory.

Why a kernel belongs to one cache entry: a cache releases what it removes, so a kernel put in a
second cache (another manager's), or under a second id, would be released by the first one's
eviction while the second still held, even pinned, it, and every seed that copied it afterwards
was refused. Which cache entry holds each kernel is recorded process-wide (weakly), and a put of
a kernel another entry holds, or another live cache removed, raises ``ValueError`` (one a
collected cache removed is released: ``KernelLoader.put`` refuses that as it is).
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections import OrderedDict
from typing import Any, Protocol

from kasmina.utils.checks import check_int
from kasmina.utils.locks import fork_safe

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_KERNELS", "CachedKernel", "GPUKernelCache"]

# Entries a cache holds at most (``KasminaConfig.cache_max_kernels``): far more artifacts than a
# run uses at once, and a bounded host-side cost (about 100 MB of tiny kernels' programs).
DEFAULT_MAX_KERNELS = 1024

# Each kernel a cache holds or removed: (that cache, its id there, or None once removed). Weak
# both ways, so a kernel or a cache that is collected drops out. Its lock is taken inside a
# cache's own lock, never the other way round.
_HOLDERS: weakref.WeakKeyDictionary[Any, tuple[weakref.ref[GPUKernelCache], str | None]] = (
    weakref.WeakKeyDictionary()
)
# Free in a forked child (``fork_safe``), as each cache's own lock is: a fetch worker's put or
# eviction at the fork may be half made in the child's copy (its byte count off by a kernel),
# which serves only the child's own loads; a lock held for good hung every one of them.
_HOLDERS_LOCK = fork_safe(threading.Lock())


class CachedKernel(Protocol):
    """What the cache needs of a kernel (``GPUKernel`` provides it). Kernels must be weakly
    referenceable (any ordinary class is): the cache remembers removed kernels weakly."""

    def get_memory_size(self) -> int: ...

    def release_gpu_memory(self) -> None: ...


class GPUKernelCache:
    """Thread-safe LRU of kernels by id, bounded by ``cache_size_mb`` of device memory and by
    ``max_kernels`` entries (the module docstring)."""

    def __init__(self, cache_size_mb: float, max_kernels: int = DEFAULT_MAX_KERNELS) -> None:
        if isinstance(cache_size_mb, bool) or not 0 <= cache_size_mb * 1024 * 1024 < math.inf:
            raise ValueError(f"cache_size_mb must be finite and >= 0, got {cache_size_mb!r}")
        self.max_kernels = check_int("max_kernels", max_kernels, 1)
        self.max_bytes = int(cache_size_mb * 1024 * 1024)
        self._entries: dict[str, tuple[CachedKernel, int]] = {}
        # Unpinned ids, least recently used first: the only eviction candidates, so neither a
        # put nor an eviction ever walks past pinned kernels (O(1) per kernel evicted).
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._bytes = 0
        self._pinned_bytes = 0
        self._evicted: weakref.WeakSet[Any] = weakref.WeakSet()  # removed, released or releasing
        self._lock = fork_safe(threading.Lock())
        self._self_ref = weakref.ref(self)
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.uncached = 0

    def get(self, kernel_id: str) -> CachedKernel | None:
        """The kernel, marked most recently used; ``None`` (a miss) when absent."""
        with self._lock:
            entry = self._entries.get(kernel_id)
            if entry is None:
                self.misses += 1
                return None
            if kernel_id in self._lru:
                self._lru.move_to_end(kernel_id)
            self.hits += 1
            return entry[0]

    def put(self, kernel_id: str, kernel: CachedKernel) -> bool:
        """Cache ``kernel``, evicting least recently used unpinned kernels to make room.

        Returns False when it is not cached: larger than the whole cache, or the room (bytes, or
        all ``max_kernels`` entries) is held by pinned kernels. The caller then serves it
        uncached (nothing is evicted in that case).
        Replacing a different kernel under an id releases the old one; a pinned id cannot be
        replaced (``ValueError``), and a kernel belongs to one entry: one that another cache
        holds or removed, or that this one holds under another id, is refused (``ValueError``).
        """
        size = int(kernel.get_memory_size())
        if size < 0:
            raise ValueError(f"kernel {kernel_id!r} reports a negative size")
        victims: list[CachedKernel] = []
        with self._lock, _HOLDERS_LOCK:
            self._check_holder(kernel_id, kernel)
            old = self._entries.get(kernel_id)
            pinned = bool(self._pins.get(kernel_id))
            if old is not None and old[0] is not kernel and pinned:
                raise ValueError(f"kernel {kernel_id!r} is pinned; unpin it before replacing it")
            old_size = old[1] if old is not None else 0
            needed = self._bytes - old_size + size - self.max_bytes
            # Unpinned bytes other than this id's own entry (which is replaced, not evicted).
            evictable = self._bytes - self._pinned_bytes - (0 if pinned else old_size)
            # Entries past ``max_kernels`` once it is in, against the unpinned others.
            extra = len(self._entries) - (old is not None) + 1 - self.max_kernels
            others = len(self._lru) - (old is not None and not pinned)
            if size > self.max_bytes or needed > evictable or extra > others:
                self.uncached += 1
                reason = "larger than the cache" if size > self.max_bytes else "room held by pins"
                logger.warning(
                    "kernel %s (%d bytes) served uncached: %s (%d of %d bytes, %d of %d "
                    "kernels used)",
                    kernel_id,
                    size,
                    reason,
                    self._bytes,
                    self.max_bytes,
                    len(self._entries),
                    self.max_kernels,
                )
                return False
            if old is not None:
                del self._entries[kernel_id]
                self._lru.pop(kernel_id, None)
                self._bytes -= old_size
                if pinned:
                    self._pinned_bytes -= old_size
                if old[0] is not kernel:
                    victims.append(old[0])
                    self._mark_removed(old[0])
            while self._bytes + size > self.max_bytes or len(self._entries) >= self.max_kernels:
                victim_id, _ = self._lru.popitem(last=False)
                victim, victim_size = self._entries.pop(victim_id)
                self._bytes -= victim_size
                self.evictions += 1
                victims.append(victim)
                self._mark_removed(victim)
                logger.debug("evicted kernel %s (%d bytes)", victim_id, victim_size)
            self._entries[kernel_id] = (kernel, size)
            _HOLDERS[kernel] = (self._self_ref, kernel_id)
            self._bytes += size
            if pinned:
                self._pinned_bytes += size
            else:
                self._lru[kernel_id] = None
        for victim in victims:
            victim.release_gpu_memory()
        return True

    def evict(self, kernel_id: str) -> bool:
        """Remove and release one kernel. False if absent or pinned (pinned stay)."""
        with self._lock:
            entry = self._entries.get(kernel_id)
            if entry is None:
                return False
            if self._pins.get(kernel_id):
                logger.warning("not evicting pinned kernel %s", kernel_id)
                return False
            del self._entries[kernel_id]
            del self._lru[kernel_id]
            self._bytes -= entry[1]
            self.evictions += 1
            with _HOLDERS_LOCK:
                self._mark_removed(entry[0])
        entry[0].release_gpu_memory()
        return True

    def _check_holder(self, kernel_id: str, kernel: CachedKernel) -> None:
        """Refuse ``kernel`` when another entry holds it (or another cache removed it: it is
        released, or being released). Under both locks."""
        claim = _HOLDERS.get(kernel)
        if claim is None:
            return
        holder, held_as = claim[0](), claim[1]
        if holder is None or (holder is self and held_as in (None, kernel_id)):
            return
        if holder is self:
            where = f"already cached here as {held_as!r}"
        elif held_as is None:
            where = "evicted from another kernel cache (released)"
        else:
            where = "held by another kernel cache (another manager's)"
        raise ValueError(
            f"kernel for {kernel_id!r} is {where}: a kernel belongs to one cache, whose eviction "
            "releases it; put a copy of it (copy.deepcopy) or load the artifact again"
        )

    def _mark_removed(self, kernel: CachedKernel) -> None:
        """Under both locks, before the kernel's release starts."""
        self._evicted.add(kernel)
        _HOLDERS[kernel] = (self._self_ref, None)

    def was_evicted(self, kernel: object) -> bool:
        """True once ``kernel`` was removed from this cache (evicted or replaced): its memory
        is released, or being released. Marked under the lock, before the release starts."""
        with self._lock:
            return kernel in self._evicted  # False for an object the cache never held

    def pin(self, kernel_id: str) -> CachedKernel:
        """Protect a cached kernel from eviction (counted: one unpin per pin); returns the
        kernel pinned, so a caller can check it is the one it holds."""
        with self._lock:
            entry = self._entries.get(kernel_id)
            if entry is None:
                raise KeyError(f"kernel {kernel_id!r} is not cached")
            count = self._pins.get(kernel_id, 0)
            if count == 0:
                del self._lru[kernel_id]
                self._pinned_bytes += entry[1]
            self._pins[kernel_id] = count + 1
            return entry[0]

    def unpin(self, kernel_id: str) -> None:
        with self._lock:
            count = self._pins.get(kernel_id, 0)
            if count == 0:
                raise KeyError(f"kernel {kernel_id!r} is not pinned")
            if count == 1:
                del self._pins[kernel_id]
                # Pinned kernels are never evicted, so the entry is still here; it re-enters
                # the LRU as most recently used (it was in use until now).
                self._pinned_bytes -= self._entries[kernel_id][1]
                self._lru[kernel_id] = None
            else:
                self._pins[kernel_id] = count - 1

    def is_pinned(self, kernel_id: str) -> bool:
        return self._pins.get(kernel_id, 0) > 0

    def clear(self) -> None:
        """Evict every unpinned kernel."""
        with self._lock:
            ids = list(self._lru)
        for kernel_id in ids:
            self.evict(kernel_id)

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __contains__(self, kernel_id: object) -> bool:
        return kernel_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "uncached": self.uncached,
                "hit_rate": self.hits / lookups if lookups else 0.0,
                "entries": len(self._entries),
                "pinned": len(self._pins),
                "bytes_used": self._bytes,
                "max_bytes": self.max_bytes,
                "max_kernels": self.max_kernels,
            }
