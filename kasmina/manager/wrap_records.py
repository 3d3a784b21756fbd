"""What ``wrap_ddp`` decided about each model it was given: one record per model.

``wrap_ddp`` (``kasmina.manager.ddp``) writes a model's ``WrapRecord`` whole at each wrap, and
three readers take their part of it back:

- the seeds' gradient sync (``kasmina.manager.grad_sync``): the host parameters DDP does not
  reduce (those frozen when it wrapped the model; every one where it returned the model
  unwrapped), which it averages with the seeds' once unfrozen;
- ``ddp.host_buffers``: whether the model was returned unwrapped with ``broadcast_buffers`` on,
  so that each epoch sync gives its host's buffers rank 0's values, as DDP would have at each
  forward (``sync_host_buffers``);
- ``host_buffers_aligned``: how the host's buffers take rank 0's values before a measurement.
  Under ``wrap_ddp`` each rank's host buffers (a batch norm's running statistics, updated in
  train mode from the rank's own shard) take rank 0's values only at the start of the next
  forward (DDP's buffer broadcast), or, for a host ``wrap_ddp`` left unwrapped, at the epoch
  sync. A measurement between (``evaluate_seeds``, in eval mode, reads them) gave each rank its
  own result on the same batches and weights: G5's score went into each rank's state table,
  and the next epoch sync found a healthy rank divergent and "repaired" it (docs/design.md §3,
  G5). It aligns them on entry, under the caller's ``kept_buffers``, which puts each rank's
  own values back after the measurement, so the next training forward sees what it would have
  seen without it.

The records are held weakly per model: a model that goes takes its record with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

__all__ = ["WrapRecord", "host_buffers_aligned", "record_wrap", "wrap_record"]


@dataclass(frozen=True)
class WrapRecord:
    """What one ``wrap_ddp`` decided about a model (the default: a model it never wrapped)."""

    # The host parameters DDP does not reduce: frozen when it wrapped the model, or every one
    # where it returned the model unwrapped.
    not_reduced: tuple[nn.Parameter, ...] = ()
    # Returned unwrapped with ``broadcast_buffers`` on: the epoch sync broadcasts its buffers.
    unwrapped_buffers: bool = False
    # The collective that gives the host's buffers the values DDP would give them next (None:
    # they are not aligned, as with ``broadcast_buffers=False``); it holds the model weakly.
    aligner: Callable[[], object] | None = None


_NOT_WRAPPED = WrapRecord()
_RECORDS: weakref.WeakKeyDictionary[nn.Module, WrapRecord] = weakref.WeakKeyDictionary()


def record_wrap(model: nn.Module, record: WrapRecord) -> None:
    """What ``wrap_ddp`` decided about ``model`` (in place of what an earlier wrap decided)."""
    _RECORDS[model] = record


def wrap_record(model: nn.Module) -> WrapRecord:
    """What the last ``wrap_ddp`` of ``model`` decided (nothing reduced elsewhere, no buffers
    to broadcast, no aligner, for a model it never wrapped)."""
    return _RECORDS.get(model, _NOT_WRAPPED)


@contextmanager
def host_buffers_aligned(model: nn.Module) -> Iterator[None]:
    """On entry, ``model``'s host buffers take rank 0's values where ``wrap_ddp`` recorded how
    (a collective: every rank enters at the same point); otherwise nothing. Nothing on exit:
    the caller's ``kept_buffers`` puts them back."""
    aligner = wrap_record(model).aligner
    if aligner is not None:
        aligner()
    yield
