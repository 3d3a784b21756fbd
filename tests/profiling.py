"""What a region ran: the host synchronisations a profiled region recorded, and the ops a
dispatch mode saw (shared by the no-sync and op-count tests)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::_local_scalar_dense")


def syncs_inside(prof: torch.profiler.profile, region: str) -> list[str]:
    """Names of the synchronising events (``SYNCS``) that started inside the one
    ``record_function(region)`` of ``prof``, in order."""
    events = prof.events()
    (window,) = [e.time_range for e in events if e.name == region]
    return [
        e.name
        for e in events
        if e.name in SYNCS and window.start <= e.time_range.start <= window.end
    ]


class DispatchedOps(TorchDispatchMode):
    """Records every op dispatched while the mode is on (``with DispatchedOps() as ops:``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def names(self) -> list[str]:
        """The ops' short names (``where``, ``eq``), in order."""
        return [func.overloadpacket.__name__ for func in self.ops]

    @property
    def scalar_reads(self) -> list[str]:
        """The device-to-host scalar reads among them (``.item()``, ``bool(t)``, ``float(t)``)."""
        reads = (torch.ops.aten._local_scalar_dense, torch.ops.aten.is_nonzero)
        return [str(func) for func in self.ops if func.overloadpacket in reads]
