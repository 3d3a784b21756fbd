"""The host synchronisations a profiled region recorded (shared by the no-sync tests)."""

from __future__ import annotations

import torch

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
