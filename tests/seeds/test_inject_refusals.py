"""What ``attach``, ``detach`` and ``KasminaLayer`` refuse before changing anything: a target
inside an existing slot, a detach of a slot that is the whole model, and a slot whose seeds
would lie outside the state table it shares."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.seeds.inject import attach, detach
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.table import GPUStateTensor


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Block(), nn.Linear(4, 2))


def _layout(model: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules()]


def test_a_target_inside_an_existing_slot_is_refused_leaving_the_model() -> None:
    """``0.host.a`` lies inside the slot ``0``: a second slot there would be moved by the
    first's detach or merge, so attach refuses it by name and the model is as it was."""
    model = _model()
    (slot,) = attach(model, ["0"], 2, 2)
    x = torch.randn(3, 4)
    layout, out = _layout(model), model(x)
    with pytest.raises(ValueError, match=r"'0\.host\.a' is nested inside '0'; target one of them"):
        attach(model, ["0.host.a"], 2, 2)
    assert _layout(model) == layout
    assert [m for m in model.modules() if isinstance(m, KasminaLayer)] == [slot]
    assert torch.equal(model(x), out)
    # Beside the slot, not inside it: taken.
    (other,) = attach(model, ["1"], 2, 1)
    assert model[1] is other and model[0] is slot


def test_detach_of_a_bare_slot_is_refused_and_keeps_the_slot() -> None:
    """A ``KasminaLayer`` is no model to detach from (there is no parent to put its host
    back in): refused, pointing at ``.host``; the slot still wraps its host."""
    host = nn.Linear(4, 4)
    slot = KasminaLayer(host, 2, 2)
    with pytest.raises(ValueError, match=r"the model itself is a KasminaLayer; use its \.host"):
        detach(slot)
    assert slot.host is host
    x = torch.randn(3, 4)
    assert torch.equal(slot(x), host(x))


@pytest.mark.parametrize("offset", [-1, 1, 3])
def test_a_state_offset_outside_the_shared_table_is_refused(offset: int) -> None:
    """Two seeds at ``offset`` of a two-row table: any offset but 0 puts a seed outside it."""
    table = GPUStateTensor(2, torch.device("cpu"))
    before = table.state_tensor.clone()
    with pytest.raises(ValueError, match=rf"layer: seeds {offset}\.\.\+2 outside the table"):
        KasminaLayer(nn.Linear(4, 4), 2, 2, state=table, state_offset=offset)
    assert torch.equal(table.state_tensor, before)


def test_slots_sharing_a_table_take_consecutive_rows() -> None:
    """The refusal's counterpart: two slots of two seeds fit a four-row table at 0 and 2."""
    table = GPUStateTensor(4, torch.device("cpu"))
    first = KasminaLayer(nn.Linear(4, 4), 2, 2, state=table, state_offset=0)
    second = KasminaLayer(nn.Linear(4, 4), 2, 2, state=table, state_offset=2)
    assert first.state_table is second.state_table is table
    assert [s.state_index for s in (*first.seeds, *second.seeds)] == [0, 1, 2, 3]
