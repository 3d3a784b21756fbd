"""``training_tensors``: tensors a safe point makes stay trainable whatever mode it is called in;
``version_count``: a tensor's in-place write count, 0 for an inference tensor (which has none)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["training_tensors", "version_count"]


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
