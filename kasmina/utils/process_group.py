"""Whether this process is one rank of a ``torch.distributed`` process group: the one test of it
(``process_group_active``), for the collectives of ``kasmina.control`` and the manager and for
the backward that must stay out of ``DistributedDataParallel``'s sight (``autograd_nodes``)."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["process_group_active"]


def process_group_active() -> bool:
    """Whether this process is one rank of a process group (``torch.distributed`` built in and
    its default group initialised): without one, every collective helper is a no-op."""
    return dist.is_available() and dist.is_initialized()
