"""Optimizer state that follows its parameters (``isolation.stepping.follow_parameters``), as
torch's ``Optimizer.load_state_dict`` casts a loaded state."""

from __future__ import annotations

import pytest
import torch

from kasmina.isolation.stepping import carried_state, follow_parameters, step_contained


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


class _Picky(torch.optim.SGD):
    """A custom class whose step needs what a probe built without ``__init__`` lacks."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, lr=lr, momentum=0.9)
        self.scale = 1.0

    def step(self, closure=None):  # type: ignore[override]
        return super().step(closure) if self.scale else None


def test_carried_state_is_what_the_group_would_make_and_changes_nothing() -> None:
    """A seed's state is carried into a host group only where the group would make the same
    keys (dtype, device, shape); from another class, or where the probe raises, none."""
    torch.manual_seed(0)
    seed, host = torch.nn.Linear(3, 2), torch.nn.Linear(3, 3)
    source = torch.optim.Adam(seed.parameters(), lr=0.1)
    seed(torch.randn(4, 3)).sum().backward()
    source.step()
    params, state = list(seed.parameters()), dict(source.state)
    target = torch.optim.Adam(host.parameters(), lr=0.01)
    carried = carried_state(source, params, target, target.param_groups[0])
    assert all(carried[p] is source.state[p] for p in params) and not target.state
    settings = target.param_groups[0]
    for group, fits in (({**settings, "amsgrad": True}, False), ({**settings, "lr": 0.5}, True)):
        assert bool(carried_state(source, params, target, group)) is fits
    sgd = torch.optim.SGD(host.parameters(), lr=0.1)
    assert carried_state(source, params, sgd, sgd.param_groups[0]) == {}
    picky_source, picky = _Picky(seed.parameters()), _Picky(host.parameters())
    picky_source.step()
    assert carried_state(picky_source, params, picky, picky.param_groups[0]) == {}
    assert dict(source.state) == state and not target.state and not picky.state
    # A group's tensor the step updates in place is the live group's: the probe steps a copy;
    # a value that cannot be copied (a non-leaf tensor) leaves the states behind, no raise.
    counted = {**settings, "count": torch.zeros(())}
    assert carried_state(source, params, target, counted) and counted["count"].item() == 0
    rate = torch.tensor(0.01, requires_grad=True) * 1.0
    assert carried_state(source, params, target, {**settings, "lr": rate}) == {}
