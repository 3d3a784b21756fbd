"""Replicated state: what every rank must hold bit for bit, its checksum, and a copy to repair from.

Why: under data parallelism every rank holds its own copy of the state Kasmina changes (the
lifecycle state table, the seeds, their optimizers). After each epoch sync the ranks compare a
checksum of it, and a rank that disagrees with the majority loads the majority's copy
(docs/design.md §5, "Multi-process runs"). The ``DistributedCoordinator``
(``kasmina.control.distributed``) does the comparing and the repair; this module holds what is
compared and moved:

- ``ReplicaState`` -- the protocol: ``checksum``, ``export_state`` and ``import_state`` (the
  kernel manager's implementation is ``ManagerReplica`` in ``kasmina.manager.coordination``);
- ``state_checksum`` and ``nested_checksum`` -- bitwise CRC-32s of named tensors, and of a nest
  of mappings, sequences, tensors and plain values (a state dict, an optimizer's state);
- ``TensorReplica`` -- a ``ReplicaState`` over named tensors of fixed names, dtypes and shapes
  (given by a ``StateProvider``), its payload length-prefixed JSON headers and raw bytes, so a
  repair unpickles nothing;
- ``BufferAverage`` -- what is per-rank by nature made to agree before the checksum: buffers
  each rank updates from its own shard (a BatchNorm's running statistics), averaged across
  ranks, integer ones only checked (``buckets``: the runs one flat all-reduce carries).
"""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from kasmina.control.processes import collective_device
from kasmina.utils.process_group import process_group_active
from kasmina.utils.ratelimit import rarely

logger = logging.getLogger(__name__)

__all__ = [
    "BufferAverage",
    "ReplicaState",
    "TensorReplica",
    "agree",
    "buckets",
    "minority_ranks",
    "nested_checksum",
    "nested_finite",
    "state_checksum",
]

T = TypeVar("T")
DEFAULT_BUCKET_BYTES = 25 * 2**20

# A length prefix (uint64) before each header and each tensor's bytes of a replica payload.
_LEN = struct.Struct("<Q")


class ReplicaState(Protocol):
    """The state every rank must hold bit for bit: its checksum, and a copy to repair from.

    One may also answer ``healthy() -> bool`` (whether its floating tensors are all finite,
    ``nested_finite``): a rank that answers False is never the one the others are repaired
    from (``minority_ranks``), so a NaN one rank's data made is not spread by the repair."""

    def checksum(self) -> int: ...

    def export_state(self) -> bytes: ...

    def import_state(self, payload: bytes) -> None: ...


StateProvider = Callable[[], Mapping[str, torch.Tensor]]


def minority_ranks(
    keys: Sequence[tuple[int, ...]], healthy: Sequence[bool] | None = None
) -> tuple[int, ...]:
    """Ranks whose key differs from the most common one among the ``healthy`` ranks (all, when
    not given or when none is), ties going to the lowest of them: a rank whose replica is not
    finite is outvoted even in a two-rank tie, and repaired from a finite one."""
    ranks = [r for r in range(len(keys)) if healthy is None or healthy[r]] or range(len(keys))
    counts = Counter(keys[r] for r in ranks)
    best = max(counts.values())
    majority = next(keys[r] for r in ranks if counts[keys[r]] == best)
    return tuple(r for r, k in enumerate(keys) if k != majority)


def nested_finite(value: Any) -> bool:
    """Whether every floating tensor in a nest of mappings and sequences (what
    ``nested_checksum`` reads) is finite; one read per device holding them."""
    flags: dict[torch.device, list[torch.Tensor]] = {}

    def walk(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            if item.is_floating_point() or item.is_complex():
                flags.setdefault(item.device, []).append(torch.isfinite(item.detach()).all())
        elif isinstance(item, Mapping):
            for v in item.values():
                walk(v)
        elif isinstance(item, (list, tuple)):
            for v in item:
                walk(v)

    walk(value)
    return all(bool(torch.stack(group).all()) for group in flags.values())


def state_checksum(state: Mapping[str, torch.Tensor]) -> int:
    """CRC-32 over names, dtypes, shapes and raw bytes of ``state`` in sorted name order.

    Bitwise: two ranks agree only if every element is bit-identical, which is what lockstep
    data parallelism promises.
    """
    crc = 0
    for name in sorted(state):
        crc = _crc_tensor(name, state[name], crc)
    return crc


def _crc_tensor(name: str, tensor: torch.Tensor, crc: int) -> int:
    t = tensor.detach()
    crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
    flat = t.to("cpu").contiguous().reshape(-1)
    if flat.numel():
        crc = zlib.crc32(flat.view(torch.uint8).numpy().tobytes(), crc)
    return crc


def nested_checksum(value: Any, crc: int = 0) -> int:
    """CRC-32 of a nest of mappings, sequences, tensors and plain values (a state dict, an
    optimizer's state): keys in sorted order, tensors by their bytes, the rest by ``repr``."""
    if isinstance(value, torch.Tensor):
        return _crc_tensor("", value, crc)
    if isinstance(value, Mapping):
        for key in sorted(value, key=repr):
            crc = nested_checksum(value[key], zlib.crc32(f"k{key!r}".encode(), crc))
        return zlib.crc32(b"}", crc)
    if isinstance(value, (list, tuple)):
        for item in value:
            crc = nested_checksum(item, zlib.crc32(b",", crc))
        return zlib.crc32(b"]", crc)
    return zlib.crc32(f"v{value!r}".encode(), crc)


class TensorReplica:
    """A ``ReplicaState`` over named tensors whose names, dtypes and shapes never change (a
    state table, a fixed set of weights): repaired by copying the source's bytes in place.

    The payload is a length-prefixed JSON header per tensor and its raw bytes, so a repair
    unpickles nothing. ``after_import`` runs after a load (e.g. ``GPUStateTensor.resync``).
    """

    def __init__(
        self, provider: StateProvider, *, after_import: Callable[[], object] | None = None
    ) -> None:
        self.provider = provider
        self.after_import = after_import

    def checksum(self) -> int:
        return state_checksum(self.provider())

    def healthy(self) -> bool:
        return nested_finite(dict(self.provider()))

    def export_state(self) -> bytes:
        chunks: list[bytes] = []
        state = self.provider()
        for name in sorted(state):
            t = state[name].detach().to("cpu").contiguous()
            header = json.dumps({"name": name, "dtype": str(t.dtype), "shape": list(t.shape)})
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
            for part in (header.encode(), data):
                chunks += [_LEN.pack(len(part)), part]
        return b"".join(chunks)

    def import_state(self, payload: bytes) -> None:
        state = self.provider()
        parts = list(_length_prefixed(payload))
        if len(parts) % 2:
            raise ValueError("replica payload is truncated")
        incoming: dict[str, tuple[dict[str, Any], bytes]] = {}
        for header, data in zip(parts[::2], parts[1::2], strict=True):
            meta = json.loads(header)
            incoming[meta["name"]] = (meta, data)
        if set(incoming) != set(state):
            raise ValueError(f"replica payload names {sorted(incoming)}, expected {sorted(state)}")
        for name, (meta, data) in incoming.items():
            live = state[name]
            if meta["dtype"] != str(live.dtype) or meta["shape"] != list(live.shape):
                raise ValueError(f"replica payload {name} is {meta}, expected {live.dtype}")
            if len(data) != live.numel() * live.element_size():
                raise ValueError(f"replica payload {name} holds {len(data)} bytes")
        with torch.no_grad():
            for name, (_, data) in incoming.items():
                live = state[name]
                if not data:
                    continue
                src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                live.copy_(src.view(live.dtype).reshape(live.shape).to(live.device))
        if self.after_import is not None:
            self.after_import()


def _length_prefixed(body: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(body):
        if pos + _LEN.size > len(body):
            raise ValueError("length-prefixed payload is truncated")
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if pos + n > len(body):
            raise ValueError("length-prefixed payload is truncated")
        yield body[pos : pos + n]
        pos += n


class BufferAverage:
    """Buffers each rank updates from its own data (a BatchNorm's running mean and variance),
    made to agree across ranks before their replicas are compared.

    Healthy ranks' statistics differ by design (each saw its own shard): left alone, the replica
    checksum would report every rank outside rank 0's group as divergent and "repair" it,
    discarding its statistics. Calling the object is a collective: every rank calls it at the
    same point, with the same buffers in the same order. A 2-integer all-reduce first checks the
    layout (names, dtypes, shapes), as the seeds' gradient average does: one that differs across
    ranks averages nothing on any rank (``stats["layout_mismatch"]``) and is left to the repair.
    Then one all-reduce of each buffer's CRC-32 finds the buffers that differ: floating ones are
    summed, one flat all-reduce per bucket (``buckets``), all launched before the first is
    waited on, and divided by the world size, the same bits on every rank; buffers equal
    everywhere are left as they are, bit for bit. Integer buffers (``num_batches_tracked``, a
    counter) agree when every rank ran the same forwards; where they differ, that is drift,
    logged and counted (``stats["integer_mismatch"]``) and left to the repair, while the floating
    ones are averaged still, so the healthy ranks agree and outvote the drifted one.
    """

    def __init__(self, *, group: Any = None, bucket_cap_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if not bucket_cap_bytes > 0:
            raise ValueError(f"bucket_cap_bytes must be > 0, got {bucket_cap_bytes}")
        self.group = group
        self.bucket_cap_bytes = bucket_cap_bytes
        self.stats: Counter[str] = Counter()

    def __call__(self, named: Sequence[tuple[str, torch.Tensor]]) -> int:
        """Average now (collective); how many buffers were averaged (0 without a group)."""
        if not process_group_active():
            return 0
        world = dist.get_world_size(self.group)
        if world == 1:
            return 0
        device = collective_device(self.group)
        text = ";".join(f"{name}|{t.dtype}|{tuple(t.shape)}" for name, t in named)
        if not agree([zlib.crc32(text.encode())], device, self.group)[0]:
            self.stats["layout_mismatch"] += 1
            logger.log(
                rarely(self.stats["layout_mismatch"], 100, logging.ERROR),
                "seed buffer layouts differ across ranks (%d sync(s) so far): no buffer is "
                "averaged on any rank; the replica repair settles them",
                self.stats["layout_mismatch"],
            )
            return 0
        if not named:
            return 0
        same = agree([_crc_tensor("", t, 0) for _, t in named], device, self.group)
        differ = [(name, t) for (name, t), ok in zip(named, same, strict=True) if not ok]
        drift = [name for name, t in differ if not t.is_floating_point()]
        if drift:
            self.stats["integer_mismatch"] += 1
            logger.error("non-floating buffers differ across ranks, left to the repair: %s", drift)
        floats = [(name, t) for name, t in differ if t.is_floating_point()]
        if floats:  # a non-finite buffer on any rank is drift: averaged, it would spread to all
            bad = torch.stack([~torch.isfinite(t).all() for _, t in floats])
            bad = bad.to(device=device, dtype=torch.int64)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=self.group)
            flags = bad.tolist()
            broken = [name for (name, _), b in zip(floats, flags, strict=True) if b]
            if broken:
                self.stats["nonfinite"] += 1
                logger.error("non-finite seed buffers on some rank, left to the repair: %s", broken)
            floats = [(name, t) for (name, t), b in zip(floats, flags, strict=True) if not b]
        floats = [t for _, t in floats]
        handles = []
        for bucket in buckets(floats, lambda t: t, self.bucket_cap_bytes):
            # Divided before the sum: summed first, fp16 statistics whose mean fp16 holds
            # (two ranks' 40,000) overflowed to inf on every rank, past the finite check above.
            flat = torch.cat([t.detach().reshape(-1) for t in bucket]).div_(world)
            handles.append((bucket, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        with torch.no_grad():
            for bucket, flat, handle in handles:
                handle.wait()
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
        if floats:
            self.stats["averaged"] += 1
            self.stats["buffers"] += len(floats)
        return len(floats)


def agree(values: list[int], device: torch.device, group: Any) -> list[bool]:
    """Whether each of ``values`` (>= 0) is the same on every rank: one MAX all-reduce of the
    values and their negatives (their maximum and minimum)."""
    both = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    row = both.tolist()
    return [row[i] == -row[len(values) + i] for i in range(len(values))]


def buckets(
    items: Sequence[T], tensor: Callable[[T], torch.Tensor], cap_bytes: int
) -> Iterator[list[T]]:
    """Consecutive runs of ``items`` whose ``tensor`` has one dtype and device, at most
    ``cap_bytes`` each (an item larger than the cap is a bucket of its own): what one flat
    all-reduce carries."""
    bucket: list[T] = []
    size, key = 0, None
    for item in items:
        t = tensor(item)
        nbytes = t.numel() * t.element_size()
        if bucket and ((t.dtype, t.device) != key or size + nbytes > cap_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(item)
        size += nbytes
        key = (t.dtype, t.device)
    if bucket:
        yield bucket
