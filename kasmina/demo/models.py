"""The demo's models: the narrow host, the teacher, the host's seed slots, and plain training."""

from __future__ import annotations

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
    model: nn.Module, cfg: DemoConfig, data: Digits, epochs: int, lr: float, rank: int, world: int
) -> nn.Module:
    """Ordinary data-parallel training (the teacher, and the seedless baseline host)."""
    from kasmina.control.processes import average_gradients

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for xb, yb in batches(data, epoch, cfg, rank, world):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            average_gradients(list(model.parameters()))
            opt.step()
    return model
