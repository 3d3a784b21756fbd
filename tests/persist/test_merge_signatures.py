"""``kasmina.merge`` of a slot whose host's ``forward`` takes keyword-only parameters (passed
through, defaults kept), and of one taking ``*args`` or ``**kwargs`` (refused by name, the
model left as it was)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import kasmina
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage as S
from tests.persist.test_merge import walk_to_active


class KeywordOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0, shift: Any = None) -> torch.Tensor:
        y = self.lin(x) * scale
        return y if shift is None else y + shift


class CallsByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blk = KeywordOnly()

    def forward(self, x: torch.Tensor, scale: float = 1.0, shift: Any = None) -> torch.Tensor:
        return self.blk(x, scale=scale, shift=shift)


def test_merge_passes_keyword_only_arguments_and_keeps_their_defaults() -> None:
    """Called with none, one or both keyword-only arguments, the merged model computes what
    the grown one did, bit for bit."""
    model = CallsByKeyword().eval()
    (slot,) = kasmina.attach(model, ["blk"], 2, 4)
    x, shift = torch.randn(3, 6), torch.randn(8)
    with torch.no_grad():
        model(x)
    walk_to_active(slot.seed(0), 4, init=1)
    calls = [(x,), (x, 3.0), (x, 2.0, shift)]
    with torch.no_grad():
        grown = [model(*args) for args in calls]
        bare = slot.host(x)
    assert not torch.equal(grown[0], bare)  # the seed contributes
    merged = kasmina.merge(model)
    assert not any(isinstance(m, KasminaLayer) for m in merged.modules())
    with torch.no_grad():
        for args, want in zip(calls, grown, strict=True):
            assert torch.equal(merged(*args), want)
        assert torch.equal(merged.blk(x, scale=2.0, shift=shift), grown[2])


class VarPositional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        return self.lin(x)


class VarKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor, **options: Any) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize(
    ("host", "named"), [(VarPositional, r"\*rest"), (VarKeyword, r"\*\*options")]
)
def test_merge_refuses_a_host_taking_variadic_arguments(host: type, named: str) -> None:
    """A merged module's signature is built from the host's named parameters; one that takes
    ``*args`` or ``**kwargs`` has none to build it from: ``ValueError`` naming the host and
    the parameter, and the model keeps its slot and every tensor."""
    torch.manual_seed(0)
    model = nn.Sequential(host(), nn.Linear(8, 3)).eval()
    (slot,) = kasmina.attach(model, ["0"], 2, 4)
    x = torch.randn(3, 6)
    with torch.no_grad():
        model(x)
    walk_to_active(slot.seed(0), 4, init=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(x)
    with pytest.raises(
        ValueError,
        match=rf"cannot merge a slot whose host \({host.__name__}\) "
        rf"takes {named}",
    ):
        kasmina.merge(model)
    assert model[0] is slot and slot.seed(0).stage == S.ACTIVE
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(x), out)
