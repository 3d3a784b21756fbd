"""``training_tensors``: tensors a safe point makes stay trainable whatever mode it is called in."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext

import torch

__all__ = ["training_tensors"]


def training_tensors() -> AbstractContextManager[object]:
    """Outside ``torch.inference_mode`` (grad mode as the caller had it) when called inside it:
    a safe point a user calls in a validation block (``end_epoch`` under inference mode) made
    a seed's kernel copy or the optimizer state a ROLLBACK restores as inference tensors, which
    no later training step may update in place or save for backward (the host trained no more,
    the seed was quarantined). Otherwise nothing: one flag read on the command path."""
    if not torch.is_inference_mode_enabled():
        return nullcontext()
    stack = ExitStack()
    grad = torch.is_grad_enabled()
    stack.enter_context(torch.inference_mode(False))  # which turns grad mode on
    stack.enter_context(torch.set_grad_enabled(grad))
    return stack
