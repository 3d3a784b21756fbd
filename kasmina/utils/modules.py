"""``in_eval_mode``: a measurement's forwards in eval mode, every module's mode put back after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["in_eval_mode"]


@contextmanager
def in_eval_mode(root: nn.Module) -> Iterator[None]:
    """``root.eval()`` for the block; after it, however it exits, each module is back in the
    mode it had, through ``train()``: a module whose ``train`` does work (a LoRA layer that
    merges its update into the weight for eval and takes it out again for training) is put
    back by that work, where writing the flags left it merged, its factors without gradient.
    ``root.train(mode)`` first, then, parents before children, ``train`` on each module still
    in another mode than it had: every module's last ``train`` call is with its own mode."""
    modes = [(module, module.training) for module in root.modules()]
    root.eval()
    try:
        yield
    finally:
        root.train(modes[0][1])
        for module, mode in modes:
            if module.training != mode:
                module.train(mode)
