"""Shared pieces of the seeds tests: a small MLP host, a seed walked along the lifecycle to a
stage, a seeded kernel, and an MLP whose head's seed is GRAFTING."""

from __future__ import annotations

import torch
from torch import nn

from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage

S = SeedStage
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


def walk(seed, stage: SeedStage) -> None:
    for step in PATH[: PATH.index(stage) + 1]:
        seed.transition_to(step)


def kernel(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def _grafting(kernel_seed: int, step: int) -> tuple[MLP, KasminaLayer]:
    """An ``MLP`` whose head's seed 0 is GRAFTING at ``step`` of 10 (seed 1 DORMANT)."""
    model = MLP()
    slot = attach(model, "head", 2, 4)[0]
    slot.seed(0).attach_kernel(kernel(4, kernel_seed))
    walk(slot.seed(0), S.GRAFTING)
    slot.update_alpha_blending(step, 10)
    return model, slot
