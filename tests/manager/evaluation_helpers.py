"""Shared pieces of the evaluation tests: known kernels (``Scale``, ``NoisyShift``) and small
slots with seeds walked to STABILIZATION on them, measured by ``evaluate_seeds`` without a
manager."""

from __future__ import annotations

import torch
from torch import nn

from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.manager.helpers import S


class Scale(nn.Module):
    """A known kernel: ``x * factor``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class NoisyShift(nn.Module):
    """A known kernel that also draws from the global RNG (its draw does not change its value)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0 + 0.0 * torch.rand(())


def _tiny() -> tuple[nn.Sequential, KasminaLayer, SlotRegistry]:
    torch.manual_seed(0)
    slot = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="fc")
    model = nn.Sequential(slot, nn.Dropout(0.5))
    registry = SlotRegistry(model, [slot])
    seed0, seed1, seed2 = slot.seeds
    seed0.attach_kernel(Scale(2.0))
    seed1.attach_kernel(NoisyShift())
    seed2.attach_kernel(Scale(-1.0))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        seed0.transition_to(stage)
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING):
        seed1.transition_to(stage)
    seed1.update_alpha_blending(10, 20, 4.0)  # alpha 0.5
    seed2.transition_to(S.ISOLATED_INIT)  # its output never reaches the host's value
    return model, slot, registry


def _stabilizing(kernel: nn.Module) -> tuple[KasminaLayer, SlotRegistry]:
    """A three-seed slot whose seed 0 runs ``kernel`` in STABILIZATION, seed 1 ``x * 2``."""
    torch.manual_seed(0)
    slot = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="fc")
    registry = SlotRegistry(nn.Sequential(slot), [slot])
    for seed, module in zip(slot.seeds, (kernel, Scale(2.0)), strict=False):
        seed.attach_kernel(module)
        for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
            seed.transition_to(stage)
    return slot, registry


def _static_batch_slot(factor: float) -> tuple[nn.Sequential, SlotRegistry, KasminaLayer]:
    torch.manual_seed(0)
    slot = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="fc")
    model = nn.Sequential(slot)
    registry = SlotRegistry(model, [slot])  # takes over DORMANT seeds only
    kernel = Scale(factor)
    kernel.signed_input_shape = (4, 2)  # an exported kernel's static batch of 4
    slot.seeds[0].attach_kernel(kernel)
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        slot.seeds[0].transition_to(stage)
    model(torch.randn(4, 3))
    return model, registry, slot


_TO_STABILIZATION = (
    SeedStage.ISOLATED_INIT,
    SeedStage.COMPATIBILITY_CHECK,
    SeedStage.GRAFTING,
    SeedStage.STABILIZATION,
)


def _scaled_seed(slot: KasminaLayer, factor: float, scripted: bool = False) -> None:
    seed = slot.seeds[0]
    seed.attach_kernel(torch.jit.script(Scale(factor)) if scripted else Scale(factor))
    for stage in _TO_STABILIZATION:
        seed.transition_to(stage)
