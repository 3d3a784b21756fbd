"""Shared pieces of the guarded blend tests: a layer of seeds in given stages (``_layer``),
kernels whose output holds a NaN, an inf or a huge value (``_Poison``, ``_ConvPoison``), one
training pass's results (``_run``), the autograd nodes near an output (``_nodes``), and the stage
mixes each path is checked on (``CASES``)."""

from __future__ import annotations

import torch
from torch import nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage
from tests.seeds.helpers import S

TO_GRAFTING = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING]
TO_STABILIZATION = [*TO_GRAFTING, S.STABILIZATION]
TO_ACTIVE = [*TO_STABILIZATION, S.ACTIVE]


def _walk(seed: GradientIsolatedSeed, stage: SeedStage) -> None:
    path = {
        S.DORMANT: [],
        S.ISOLATED_INIT: TO_GRAFTING[:1],
        S.GRAFTING: TO_GRAFTING,
        S.STABILIZATION: TO_STABILIZATION,
        S.ACTIVE: TO_ACTIVE,
    }[stage]
    for step in path:
        seed.transition_to(step)


class _Poison(nn.Module):
    """A Linear whose output has ``value`` written into it (NaN, inf or a huge finite)."""

    def __init__(self, width: int, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y.index_fill(-1, torch.tensor([0], device=y.device), self.value)


class _ConvPoison(nn.Module):
    def __init__(self, width: int, value: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 1)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).index_fill(1, torch.tensor([0]), self.value)


def _layer(
    stages: list[SeedStage],
    host: nn.Module,
    chunk: int,
    chunk_dim: int = -1,
    kernels: dict[int, nn.Module] | None = None,
) -> KasminaLayer:
    torch.manual_seed(0)
    layer = KasminaLayer(host, len(stages), chunk, chunk_dim=chunk_dim)
    for k, (seed, stage) in enumerate(zip(layer.seeds, stages, strict=True)):
        if stage == S.DORMANT:
            continue
        kernel = (kernels or {}).get(k)
        if kernel is None:
            conv = chunk_dim == 1 and isinstance(host, nn.Conv2d)
            kernel = nn.Conv2d(chunk, chunk, 1) if conv else nn.Linear(chunk, chunk)
            kernel = nn.Sequential(kernel, nn.Tanh())
        seed.attach_kernel(kernel)
        _walk(seed, stage)
    layer.update_alpha_blending(3, 10)
    return layer


def _nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes within two steps of ``out``."""
    names, frontier = set(), [out.grad_fn]
    for _ in range(3):
        nodes = [node for node in frontier if node is not None]
        names |= {type(node).__name__ for node in nodes}
        frontier = [nxt for node in nodes for nxt, _ in node.next_functions]
    return names


def _run(layer: KasminaLayer, x: torch.Tensor, w: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * w).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, layer._finite_flags.clone(), out


CASES = {
    "all grafting": ([S.GRAFTING] * 4, {}),
    "grafting and stabilization": ([S.GRAFTING, S.STABILIZATION, S.GRAFTING, S.GRAFTING], {}),
    "stabilization only": ([S.STABILIZATION] * 3, {}),
    "a dormant seed passes the host": ([S.GRAFTING, S.DORMANT, S.GRAFTING], {}),
    "a NaN output falls back": ([S.GRAFTING, S.GRAFTING, S.STABILIZATION], {1: float("nan")}),
    "an inf output falls back": ([S.STABILIZATION, S.GRAFTING], {0: float("inf")}),
    "stabilization only, a NaN falls back": ([S.STABILIZATION] * 3, {2: float("nan")}),
}
