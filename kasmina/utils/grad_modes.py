"""``training_tensors``: tensors a safe point makes stay trainable whatever mode it is called in;
``in_grad_mode``: a call in a grad mode that a Ctrl-C cannot leave changed; ``version_count``:
a tensor's in-place write count, 0 for an inference tensor (which has none)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["in_grad_mode", "training_tensors", "version_count"]

T = TypeVar("T")


def in_grad_mode(enabled: bool, fn: Callable[[], T]) -> T:
    """``fn()`` with grad mode ``enabled``, the thread's mode put back whatever happens. Both
    switches are C calls inside the ``try``: a ``with torch.no_grad()`` block's Python
    ``__enter__``/``__exit__``, or a switch made before the ``try`` (CPython handles a pending
    signal as a call returns), could take a Ctrl-C and leave grad mode changed for the thread."""
    mode = torch.is_grad_enabled()
    try:
        torch._C._set_grad_enabled(enabled)
        return fn()
    finally:
        torch._C._set_grad_enabled(mode)


@contextmanager
def training_tensors() -> Iterator[None]:
    """Outside ``torch.inference_mode`` (grad mode as the caller had it) when entered inside it:
    a safe point a user calls in a validation block (``end_epoch`` under inference mode) made
    a seed's kernel copy or the optimizer state a ROLLBACK restores as inference tensors, which
    no later training step may update in place or save for backward (the host trained no more,
    the seed was quarantined). Otherwise nothing: one flag read on the command path."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False), torch.set_grad_enabled(grad):  # the first turns grad on
        yield


def version_count(t: torch.Tensor) -> int:
    """``t._version``, or 0 for an inference tensor, which keeps no counter (reading it raises:
    a model ``kasmina.load``-ed or deep-copied under ``torch.inference_mode`` holds them, and
    every forward of its seeds raised). An inference tensor is never updated outside inference
    mode, so 0 stays true for a write count compared across a block."""
    return 0 if t.is_inference() else t._version
