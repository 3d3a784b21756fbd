"""The optimizer state's checks (isolation.optimizer_state): each part of a saved layout that
does not fit the live optimizers is refused before anything loads, and a format-1 state's
parameter names are merged as its groups are."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.isolation.optimizer_state import upgrade_state_dict
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.utils.state_io import clone_state
from tests.isolation.helpers import fill_grads, models


def _stepped(cls: type[torch.optim.Optimizer] = torch.optim.Adam) -> IsolatedOptimizerManager:
    host, seed = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=cls)
    opts.initialize_host(host.parameters(), lr=0.01)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=0.01)
    fill_grads(host, seed)
    opts.step_many(["host", "s0"])
    return opts


def test_a_state_of_an_unknown_format_is_refused_by_the_check_itself() -> None:
    """``validate_state_dict`` is what a manager's load runs on the checkpoint as saved: a
    format this version cannot read is refused there, not checked as if it were current."""
    opts = _stepped()
    state = clone_state(opts.state_dict())
    opts.validate_state_dict(state)
    with pytest.raises(ValueError, match="unsupported optimizer state format 99"):
        opts.validate_state_dict({**state, "format": 99})


def test_a_state_saved_by_another_optimizer_class_is_refused() -> None:
    """AdamW's groups hold Adam's keys: Adam's state loaded into it would set its
    ``decoupled_weight_decay`` off, an AdamW stepping as Adam with no error."""
    state = clone_state(_stepped(torch.optim.Adam).state_dict())
    live = _stepped(torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer 'host': saved class 'Adam'"):
        live.load_state_dict(state)
    assert live.optimizer("host").param_groups[0]["decoupled_weight_decay"] is True


def test_group_sizes_that_differ_are_refused_before_any_optimizer_loads() -> None:
    """A seed's state whose one group is saved as two, same tensors and shapes: refused by the
    check, before the host's state (first in order) is loaded, not by torch part-way."""
    opts = _stepped()
    state = clone_state(opts.state_dict())
    (group,) = state["optimizers"]["s0"]["state"]["param_groups"]
    first, second = group["params"]
    split = [dict(group, params=[first]), dict(group, params=[second])]
    state["optimizers"]["s0"]["state"]["param_groups"] = split
    host_opt = opts.optimizer("host")
    moments = [host_opt.state[p]["exp_avg"].clone() for p in host_opt.param_groups[0]["params"]]
    for p in host_opt.param_groups[0]["params"]:
        host_opt.state[p]["exp_avg"].add_(1.0)  # so a load of the saved state would show
    with pytest.raises(ValueError, match=r"optimizer 's0': group sizes \[1, 1\] != \[2\]"):
        opts.load_state_dict(state)
    for p, m in zip(host_opt.param_groups[0]["params"], moments, strict=True):
        assert torch.equal(host_opt.state[p]["exp_avg"], m + 1.0)  # nothing loaded


def test_a_host_group_not_yet_taken_up_counts_only_when_names_are_given() -> None:
    """A manager's load checks the state before it takes up a group the user added since: that
    group counts, named as the model names it, when ``names`` is given, and not otherwise."""
    host, _ = models()
    other, _ = models(1)
    names = {id(p): n for n, p in nn.ModuleDict({"host": host, "other": other}).named_parameters()}
    names_of = lambda params: [names[id(p)] for p in params]  # noqa: E731
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=0.01)
    opts.optimizer("host").add_param_group({"params": list(other.parameters()), "lr": 0.1})
    opts.take_host_groups(names_of)
    state = clone_state(opts.state_dict())
    assert state["optimizers"]["host"]["added_groups"] == [["other.weight", "other.bias"]]
    fresh = IsolatedOptimizerManager()
    fresh.initialize_host(host.parameters(), lr=0.01)
    fresh.optimizer("host").add_param_group({"params": list(other.parameters()), "lr": 0.1})
    fresh.validate_state_dict(state, names_of)
    with pytest.raises(ValueError, match="saved added groups"):
        fresh.validate_state_dict(state)


def _format1_groups(names: list[list[str]] | None) -> dict:
    """A format-1 host state of three groups (the host's, two promoted seeds'), each group's
    parameter names as ``names`` gives them (None: a group without any)."""
    sizes = [2, 1, 2]
    groups, start = [], 0
    for i, size in enumerate(sizes):
        group = {"lr": 0.01, "params": list(range(start, start + size))}
        if names is not None and names[i]:
            group["param_names"] = names[i]
        groups.append(group)
        start += size
    item = {"class": "Adam", "groups": ["host", "s0", "s1"], "state": {"state": {}}}
    item["state"]["param_groups"] = groups
    return {"format": 1, "optimizers": {"host": item}}


def test_a_format_1_states_parameter_names_are_merged_with_its_groups() -> None:
    """torch's load takes a saved group's ``param_names`` over the live ones: merged, they name
    every parameter of the merged group in order; where a group had none, the merged group has
    none (a list naming only some of its parameters would misname the rest)."""
    named = [["w", "b"], ["s0.0"], ["s1.0", "s1.1"]]
    (group,) = upgrade_state_dict(_format1_groups(named))["optimizers"]["host"]["state"][
        "param_groups"
    ]
    assert group["params"] == [0, 1, 2, 3, 4]
    assert group["param_names"] == ["w", "b", "s0.0", "s1.0", "s1.1"]
    partly = [["w", "b"], [], ["s1.0", "s1.1"]]
    (group,) = upgrade_state_dict(_format1_groups(partly))["optimizers"]["host"]["state"][
        "param_groups"
    ]
    assert group["params"] == [0, 1, 2, 3, 4] and "param_names" not in group
