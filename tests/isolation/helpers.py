"""Shared pieces of the isolation tests: a small host and seed, gradients to step them with."""

from __future__ import annotations

import torch
from torch import nn


def models(seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    """A host and a seed module, seeded for repeatable weights."""
    torch.manual_seed(seed)
    return nn.Linear(4, 4), nn.Linear(4, 4)


def fill_grads(*modules: nn.Module, scale: float = 1.0) -> None:
    """Random gradients on every parameter of ``modules``, times ``scale``."""
    for module in modules:
        for p in module.parameters():
            p.grad = torch.randn_like(p) * scale
