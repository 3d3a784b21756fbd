"""The host's buffers alike on every rank for a measurement (docs/design.md §3, G5).

Under ``wrap_ddp`` each rank's host buffers (a batch norm's running statistics, updated in
train mode from the rank's own shard) take rank 0's values only at the start of the next
forward (DDP's buffer broadcast), or, for a host ``wrap_ddp`` left unwrapped, at the epoch sync
(``sync_host_buffers``). A measurement between (``evaluate_seeds``, in eval mode, reads them)
gave each rank its own result on the same batches and weights: G5's score went into each
rank's state table, and the next epoch sync found a healthy rank divergent and "repaired" it.
``wrap_ddp`` records here how the model's host buffers are aligned; ``host_buffers_aligned``
does it on entry, under the caller's ``kept_buffers``, which puts each rank's own values back
after the measurement, so the next training forward sees what it would have seen without it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["align_with", "host_buffers_aligned"]

# model -> the collective that gives its host's buffers the values DDP would give them next.
_ALIGNERS: weakref.WeakKeyDictionary[nn.Module, Callable[[], object]] = weakref.WeakKeyDictionary()


def align_with(model: nn.Module, aligner: Callable[[], object] | None) -> None:
    """Record how ``model``'s host buffers are aligned across ranks (None: they are not, such
    as with ``broadcast_buffers=False``). ``aligner`` must not hold ``model`` strongly."""
    if aligner is None:
        _ALIGNERS.pop(model, None)
    else:
        _ALIGNERS[model] = aligner


@contextmanager
def host_buffers_aligned(model: nn.Module) -> Iterator[None]:
    """On entry, ``model``'s host buffers take rank 0's values where ``wrap_ddp`` recorded how
    (a collective: every rank enters at the same point); otherwise nothing. Nothing on exit:
    the caller's ``kept_buffers`` puts them back."""
    aligner = _ALIGNERS.get(model)
    if aligner is not None:
        aligner()
    yield
