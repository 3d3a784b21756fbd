"""Optimizer state that follows its parameters (``isolation.stepping.follow_parameters``), as
torch's ``Optimizer.load_state_dict`` casts a loaded state."""

from __future__ import annotations

import pytest
import torch

from kasmina.isolation.stepping import follow_parameters, step_contained


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, amsgrad=True, foreach=True),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
    ],
    ids=["adam", "adamw-amsgrad-foreach", "sgd-momentum", "adam-fused"],
)
def test_state_follows_a_dtype_change_as_load_state_dict_casts_it(make) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = make(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    model.double()
    want = make(model.parameters())  # torch's own cast: a state_dict loaded into the new params
    want.load_state_dict(optimizer.state_dict())
    assert follow_parameters(optimizer) == 2
    for p in model.parameters():
        got, expected = optimizer.state[p], want.state[p]
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert got[key].dtype == value.dtype and got[key].device == value.device, key
    model.zero_grad()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    optimizer.step()  # it steps in the new dtype
    assert follow_parameters(optimizer) == 0  # nothing more to cast


def test_a_fused_groups_step_counter_follows_its_parameters_device() -> None:
    """torch keeps a fused or capturable group's ``step`` float32 on its parameter's device;
    a plain group's stays where it is."""
    from kasmina.isolation.stepping import _followed

    param = torch.empty(2, device="meta")
    step = torch.tensor(3.0)
    assert _followed("step", step, param, on_device=False) is step
    moved = _followed("step", step, param, on_device=True)
    assert moved.device.type == "meta" and moved.dtype == torch.float32
    assert _followed("exp_avg", torch.zeros(2), param, on_device=False).device.type == "meta"


def test_a_step_that_raises_resets_the_state_it_left_part_way() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    optimizer.state[model.bias]["exp_avg"] = torch.zeros(5)  # the second parameter's is wrong
    failures: dict = {}
    assert not step_contained(optimizer, "s", failures)
    assert failures["s"][0] == 1 and not optimizer.state
    assert step_contained(optimizer, "s", failures)  # afresh
