"""Replicated state: what every rank must hold bit for bit, its checksum, and a copy to repair from.

Why: under data parallelism every rank holds its own copy of the state Kasmina changes (the
lifecycle state table, the seeds, their optimizers). After each epoch sync the ranks compare a
checksum of it, and a rank that disagrees with the majority loads the majority's copy
(docs/design.md §5, "Multi-process runs"). The ``DistributedCoordinator``
(``kasmina.control.distributed``) does the comparing and the repair; this module holds what is
compared and moved:

- ``ReplicaState`` -- the protocol: ``checksum``, ``export_state`` and ``import_state`` (the
  kernel manager's implementation is ``ManagerReplica`` in ``kasmina.manager.ddp``);
- ``state_checksum`` and ``nested_checksum`` -- bitwise CRC-32s of named tensors, and of a nest
  of mappings, sequences, tensors and plain values (a state dict, an optimizer's state);
- ``TensorReplica`` -- a ``ReplicaState`` over named tensors of fixed names, dtypes and shapes
  (given by a ``StateProvider``), its payload length-prefixed JSON headers and raw bytes, so a
  repair unpickles nothing.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import torch

__all__ = [
    "ReplicaState",
    "TensorReplica",
    "nested_checksum",
    "state_checksum",
]

# A length prefix (uint64) before each header and each tensor's bytes of a replica payload.
_LEN = struct.Struct("<Q")


class ReplicaState(Protocol):
    """The state every rank must hold bit for bit: its checksum, and a copy to repair from."""

    def checksum(self) -> int: ...

    def export_state(self) -> bytes: ...

    def import_state(self, payload: bytes) -> None: ...


StateProvider = Callable[[], Mapping[str, torch.Tensor]]


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
