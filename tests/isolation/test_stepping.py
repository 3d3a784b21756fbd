"""Optimizer state that follows its parameters (``isolation.stepping.follow_parameters``), as
torch's ``Optimizer.load_state_dict`` casts a loaded state; clipping, carrying over, containment."""

from __future__ import annotations

import pytest
import torch

from kasmina.isolation.stepping import (
    carried_state,
    clip_gradients,
    follow_parameters,
    state_shape_problem,
    step_contained,
)


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
    count = torch.tensor([3])  # a state that is not floating point keeps its dtype, as in torch
    assert _followed("count", count, torch.empty(2, dtype=torch.float64), False) is count


@pytest.mark.parametrize("flag", ["fused", "capturable"])
def test_either_flag_puts_a_groups_step_counter_on_its_parameters_device(flag: str) -> None:
    param = torch.nn.Parameter(torch.empty(2, device="meta"))
    optimizer = torch.optim.Adam([param], lr=0.1)
    optimizer.param_groups[0][flag] = True
    optimizer.state[param] = {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2, device="meta")}
    assert follow_parameters(optimizer) == 1
    assert optimizer.state[param]["step"].device.type == "meta"


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
    for other in (torch.optim.SGD, torch.optim.AdamW):  # AdamW: the same keys and shapes
        made = other(host.parameters(), lr=0.1)
        assert carried_state(source, params, made, made.param_groups[0]) == {}
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


def _grads(bad: float) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn(3) * 10
    params[1].grad[0] = bad
    return params


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_norm_leaves_every_gradient_as_it_was(bad: float) -> None:
    """torch's clip scales by 0 or NaN on a non-finite norm; here nothing is scaled: the caller
    skips the step on the norm, and the gradients stay the backward's (a GradScaler reads them)."""
    params = _grads(bad)
    before = [p.grad.clone() for p in params]
    assert not torch.isfinite(clip_gradients(params, 1.0))
    for p, grad in zip(params, before, strict=True):
        torch.testing.assert_close(p.grad, grad, rtol=0, atol=0, equal_nan=True)


def test_a_clip_norm_of_zero_is_refused_before_any_gradient_is_scaled() -> None:
    """A norm of 0 would zero every gradient (0: "no clipping" is the callers' to decide)."""
    params = _grads(1.0)
    before = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_gradients(params, 0.0)
    assert all(torch.equal(p.grad, grad) for p, grad in zip(params, before, strict=True))


def test_gradients_of_a_model_cast_to_float64_are_clipped_as_torch_clips_them() -> None:
    """The fused norms read fp32, fp16 and bf16; a model cast with ``.double()`` after its
    optimizers were made (a gradient check) is clipped through torch's own norms."""
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    twin.load_state_dict(model.state_dict())
    for m in (model, twin):
        m(torch.ones(4, 3, dtype=torch.float64)).pow(2).sum().backward()
    want = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    total = clip_gradients(list(model.parameters()), 0.5)
    torch.testing.assert_close(total.double(), want)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_saved_state_for_a_parameter_the_optimizer_lacks_is_refused() -> None:
    """A state's key is a parameter's index: one out of range, negative (it would be read as
    another parameter's) or not an int is named, never an ``IndexError`` or a wrong check."""
    optimizer = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    moments = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    for index in (2, -1, "0"):
        problem = state_shape_problem(optimizer, {"state": {index: moments}})
        assert problem == f"a state for parameter {index!r}, of 2"
    assert state_shape_problem(optimizer, {"state": {1: moments}}) is None


def test_a_step_count_saved_as_a_number_is_taken_and_a_bool_is_not() -> None:
    """Older torch saved ``step`` as a Python number: taken. A bool is no count."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    moments = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    for step in (3, 3.0):
        assert state_shape_problem(optimizer, {"state": {0: {**moments, "step": step}}}) is None
    problem = state_shape_problem(optimizer, {"state": {0: {**moments, "step": True}}})
    assert problem == "state 'step' of parameter 0 is not a number"
