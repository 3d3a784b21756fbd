"""A slot built around a host in eval mode (``kasmina.load``, ``kasmina.merge`` after an
``attach`` to an ``eval()`` model) is in eval mode too, not in a new module's train mode."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import kasmina
from kasmina.stages import SeedStage
from tests.manager.helpers import PUBLISHER, Host

PATH = [
    SeedStage.ISOLATED_INIT,
    SeedStage.COMPATIBILITY_CHECK,
    SeedStage.GRAFTING,
    SeedStage.STABILIZATION,
    SeedStage.ACTIVE,
]


def test_load_into_an_eval_host_gives_eval_slots_seeds_and_kernels(saved: Path) -> None:
    fresh = Host().eval()
    slot = kasmina.load(saved, fresh, publishers=PUBLISHER.trusted_publishers())[0]
    assert fresh.out is slot and not slot.training and not slot.seeds.training
    for seed in slot.seeds:
        assert not seed.training
        assert seed.kernel is not None and not seed.kernel.training
    assert not fresh.training and not fresh.inp.training and not slot.host.training
    trained = Host()  # a host in train mode gets a slot in train mode, as before
    slot = kasmina.load(saved, trained, publishers=PUBLISHER.trusted_publishers())[0]
    assert slot.training and all(seed.training for seed in slot.seeds)


def test_merge_of_a_slot_attached_in_eval_mode_is_in_eval_mode() -> None:
    model = Host().eval()
    slot = kasmina.attach(model, "out", 2, 2)[0]
    torch.manual_seed(1)
    slot.seed(0).attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()).eval())
    for stage in PATH:
        slot.seed(0).transition_to(stage)
    merged = kasmina.merge(model)
    assert merged.out is not slot.host and hasattr(merged.out, "seed_0")  # a merged module
    assert not merged.out.training and not merged.out.host.training


def test_a_kernel_grafted_into_a_seed_takes_the_seeds_mode() -> None:
    """Like a module the model's ``train()``/``eval()`` reached: a kernel grafted into an eval
    model does not run in train mode (dropout on) until the next ``model.eval()``."""
    model = Host().eval()
    slot = kasmina.attach(model, "out", 2, 2)[0]
    kernel = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))  # a new module: train mode
    slot.seed(0).attach_kernel(kernel)
    assert not any(m.training for m in kernel.modules())
    model.train()
    other = nn.Sequential(nn.Linear(2, 2)).eval()
    slot.seed(1).attach_kernel(other)
    assert all(m.training for m in other.modules())


def test_a_kernel_whose_train_returns_nothing_is_still_grafted() -> None:
    """A user's ``train()`` override that forgets ``return self`` (one that keeps a batch norm
    frozen, say) must not leave the seed holding None."""

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

        def train(self, mode: bool = True) -> None:  # type: ignore[override]
            self.training = mode

    slot = kasmina.attach(Host(), "out", 2, 2)[0]
    kernel = Frozen()
    slot.seed(0).attach_kernel(kernel)
    assert slot.seed(0).kernel is kernel
