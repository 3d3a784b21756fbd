"""The demo's models: the narrow host, the teacher, the host's seed slots, and plain training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kasmina.demo.config import KD, SLOTS, DemoConfig
from kasmina.demo.data import Digits, batches
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.table import GPUStateTensor


class HostMLP(nn.Module):
    """A deliberately narrow host: the capacity is what the seeds bring."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class PlainMLP(nn.Module):
    """The static baseline: an ordinary two-hidden-layer MLP, sized to match a grown model."""

    def __init__(self, widths: tuple[int, int]) -> None:
        super().__init__()
        self.widths = widths
        self.fc1 = nn.Linear(64, widths[0])
        self.fc2 = nn.Linear(widths[0], widths[1])
        self.head = nn.Linear(widths[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def plain_parameters(widths: tuple[int, int]) -> int:
    w1, w2 = widths
    return 65 * w1 + (w1 + 1) * w2 + (w2 + 1) * 10


def matching_widths(parameters: int, max_width: int = 256) -> tuple[int, int]:
    """Hidden widths, at most 2 apart (a plain wider MLP, no bottleneck), whose ``PlainMLP`` is
    closest in size to ``parameters`` (ties: the more even pair, then the narrower first)."""
    pairs = [
        (w1, w2)
        for w1 in range(1, max_width + 1)
        for w2 in range(max(1, w1 - 2), min(max_width, w1 + 2) + 1)
    ]
    return min(pairs, key=lambda w: (abs(plain_parameters(w) - parameters), abs(w[0] - w[1]), w))


def teacher_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def graft_slots(model: HostMLP, telemetry: Any, embargo_epochs: int) -> list[KasminaLayer]:
    """Wrap fc1, fc2 and head in KasminaLayers over one shared state table (SLOTS)."""
    device = next(model.parameters()).device
    table = GPUStateTensor(
        sum(n for _, n, _, _ in SLOTS), device, embargo_epochs=embargo_epochs, telemetry=telemetry
    )
    slots, offset = [], 0
    for region, (name, n, width, distils) in enumerate(SLOTS):
        layer = KasminaLayer(
            getattr(model, name),
            n,
            width,
            kd_config=KD if distils else None,
            state=table,
            state_offset=offset,
            layer_id=name,
            region_id=region,
        )
        setattr(model, name, layer)
        slots.append(layer)
        offset += n
    return slots


def train_plain(
    model: nn.Module,
    cfg: DemoConfig,
    data: Digits,
    epochs: int,
    lr: float,
    rank: int,
    world: int,
    *,
    max_steps: int | None = None,
    on_epoch: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Ordinary data-parallel training (the teacher and the baselines): Adam at ``lr``, the
    same shuffled batches of ``data.train`` as the grown host's. ``max_steps`` stops early, at
    an optimizer-step budget; ``on_epoch`` is called after each epoch (test curves)."""
    from kasmina.control.processes import average_gradients

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    for epoch in range(epochs):
        for xb, yb in batches(data, epoch, cfg, rank, world):
            if max_steps is not None and steps >= max_steps:
                return model
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            average_gradients(list(model.parameters()))
            opt.step()
            steps += 1
        if on_epoch is not None:
            on_epoch(model)
    return model
