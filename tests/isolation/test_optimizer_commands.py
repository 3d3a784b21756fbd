"""A controller's optimizer command: read (``read_optimizer_command``: only a verified command
gets in, its float32 fields read back as set) and applied (``apply_optimizer_command``: each
command type onto the optimizer manager's calls, a rejection logged and answered False)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from kasmina.control.commands import KasminaCommand
from kasmina.isolation.optimizer_commands import OptimizerOrder, read_optimizer_command, step_lrs
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.leyline import AdaptationCommand, CommandType, OptimizerCommand
from tests.isolation.helpers import fill_grads, models


def _cmd(kind: int, oid: str = "", **fields) -> KasminaCommand:
    """A verified optimizer command, as the handler hands it on (no signature to check here)."""
    params = fields.pop("parameters", {})
    cmd = OptimizerCommand(command_type=kind, optimizer_id=oid, **fields)
    cmd.parameters.update(params)
    return KasminaCommand("cmd", "optimizer", 0, 1.0, optimizer=cmd)


def test_every_optimizer_command_type():
    host, seed = models()
    teacher = nn.Linear(4, 4)
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("host", host.parameters)
    opts.set_parameter_source("s0", seed.parameters)
    opts.set_parameter_source("teacher", teacher.parameters)

    ok = opts.apply_optimizer_command(
        _cmd(
            CommandType.COMMAND_TYPE_INITIALIZE_HOST,
            learning_rate=0.01,
            parameters={"weight_decay": 0.1, "beta1": 0.8, "beta2": 0.95},
        )
    )
    assert ok
    group = opts.optimizer("host").param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (0.01, 0.1, (0.8, 0.95))

    assert opts.apply_optimizer_command(_cmd(CommandType.COMMAND_TYPE_CREATE_SEED, "s0"))
    assert opts.optimizer("s0").param_groups[0]["lr"] == 1e-3

    fill_grads(host, seed, scale=100.0)
    before = host.weight.clone()
    step = _cmd(CommandType.COMMAND_TYPE_STEP, "host", grad_clip_norm=1.0, learning_rate=0.5)
    assert opts.apply_optimizer_command(step)
    assert opts.optimizer("host").param_groups[0]["lr"] == 0.5
    assert float(opts.last_grad_norm["host"]) > 1.0
    assert not torch.equal(host.weight, before)

    assert len(opts.optimizer("host").state) == 2
    assert opts.apply_optimizer_command(_cmd(CommandType.COMMAND_TYPE_RESET_STATE, "host"))
    assert len(opts.optimizer("host").state) == 0

    assert opts.apply_optimizer_command(_cmd(CommandType.COMMAND_TYPE_REGISTER_TEACHER))
    assert not teacher.weight.requires_grad
    opts.set_parameter_source("s_bad", teacher.parameters)
    assert not opts.apply_optimizer_command(_cmd(CommandType.COMMAND_TYPE_CREATE_SEED, "s_bad"))

    assert opts.apply_optimizer_command(_cmd(CommandType.COMMAND_TYPE_STEP, "s0"))


def test_register_teacher_takes_only_the_teachers_parameters():
    """REGISTER_TEACHER naming a seed (a DORMANT one, with no parameters) was applied: it
    registered nothing and let go of the teacher registered before, reported as done."""
    host, seed = models()
    teacher = nn.Linear(4, 4)
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("s0", lambda: [])  # a DORMANT seed: no kernel, no parameters
    opts.set_parameter_source("s1", seed.parameters)
    opts.set_parameter_source("teacher", teacher.parameters)
    register = CommandType.COMMAND_TYPE_REGISTER_TEACHER
    assert opts.apply_optimizer_command(_cmd(register, "teacher"))
    for oid in ("s0", "s1", "host"):
        assert not opts.apply_optimizer_command(_cmd(register, oid))
    assert opts.teacher_param_count == 20 and opts.owner_of(teacher.weight) == "teacher"
    assert all(p.requires_grad for p in seed.parameters())
    opts.set_parameter_source("teacher", lambda: [])  # a teacher source that finds none
    assert not opts.apply_optimizer_command(_cmd(register))


def test_wire_messages_are_not_accepted_as_commands():
    """Only a verified command gets in: a parsed message carries no checked signature."""
    host, _ = models()
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("host", host.parameters)
    bare = _cmd(CommandType.COMMAND_TYPE_INITIALIZE_HOST).optimizer
    envelope = AdaptationCommand(command_id="x", optimizer_command=bare)
    for wire in (bare, envelope, bare.SerializeToString(), KasminaCommand("x", "seed", 0, 1.0)):
        with pytest.raises(TypeError):
            opts.apply_optimizer_command(wire)  # type: ignore[arg-type]
    assert opts.optimizer_ids == [] and not hasattr(opts, "handle_optimizer_command")


@pytest.mark.parametrize(
    "cmd",
    [
        _cmd(CommandType.COMMAND_TYPE_UNSPECIFIED, "host"),
        _cmd(CommandType.COMMAND_TYPE_STEP, "missing"),
        _cmd(CommandType.COMMAND_TYPE_RESET_STATE, "missing"),
        _cmd(CommandType.COMMAND_TYPE_CREATE_SEED, "no_source"),
        _cmd(CommandType.COMMAND_TYPE_CREATE_SEED, ""),
        _cmd(CommandType.COMMAND_TYPE_INITIALIZE_HOST, "host", parameters={"bogus": 1.0}),
    ],
    ids=["unspecified", "step-unknown", "reset-unknown", "no-source", "no-id", "bad-option"],
)
def test_bad_commands_are_rejected_cleanly(cmd):
    host, _ = models()
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("host", host.parameters)
    assert opts.apply_optimizer_command(cmd) is False
    assert opts.optimizer_ids == []


def test_a_flood_of_refused_commands_is_logged_rarely(caplog: pytest.LogCaptureFixture) -> None:
    """Each refusal is an ERROR record no more: a signer's stream of bad commands (each with a
    fresh nonce) logged one per command, where the handler and the manager log theirs rarely.
    The first and every 100th are ERROR records, the rest DEBUG; each is still answered False
    with its reason in ``last_refusal``."""
    host, _ = models()
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("host", host.parameters)
    caplog.set_level(logging.DEBUG, logger="kasmina.isolation.optimizers")
    for _ in range(100):
        assert not opts.apply_optimizer_command(_cmd(CommandType.COMMAND_TYPE_STEP, "missing"))
    assert "KeyError" in opts.last_refusal and opts.refused_commands == 100
    levels = [r.levelno for r in caplog.records if "rejected" in r.getMessage()]
    assert levels == [logging.ERROR] + [logging.DEBUG] * 98 + [logging.ERROR]


def test_a_command_is_read_into_plain_values():
    step = _cmd(
        CommandType.COMMAND_TYPE_STEP,
        "s0",
        learning_rate=0.01,
        grad_clip_norm=0.1,
        parameters={"beta2": 0.95, "eps": 1e-6},
    )
    assert read_optimizer_command(step) == OptimizerOrder(
        kind=CommandType.COMMAND_TYPE_STEP,
        optimizer_id="s0",
        learning_rate=0.01,  # the decimal it was set from, not float32's 0.009999999776
        grad_clip_norm=0.1,
        options={"betas": (0.9, 0.95), "eps": 1e-6},
    )
    plain = read_optimizer_command(_cmd(CommandType.COMMAND_TYPE_INITIALIZE_HOST))
    assert (plain.optimizer_id, plain.learning_rate, plain.grad_clip_norm) == ("", None, 0.0)
    assert plain.options == {}


class _Lion(torch.optim.SGD):
    """An optimizer class whose own ``betas`` default is not Adam's."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple = (0.95, 0.98)) -> None:
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group["betas"] = betas


@pytest.mark.parametrize(
    ("cls", "attach", "given", "betas"),
    [
        (torch.optim.Adam, {"betas": (0.8, 0.95)}, {"beta2": 0.98}, (0.8, 0.98)),
        (torch.optim.Adam, {"betas": (0.8, 0.95)}, {"beta1": 0.7}, (0.7, 0.95)),
        (_Lion, {}, {"beta1": 0.9}, (0.9, 0.98)),
    ],
    ids=["attach-beta1", "attach-beta2", "class-default"],
)
def test_a_creation_with_one_beta_keeps_the_other(cls, attach, given, betas) -> None:
    """A command's ``beta1`` (or ``beta2``) alone changes that one: the other stays as the
    options it is applied over have it (attach's, else the class's), not torch Adam's."""
    host, seed = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=cls, default_options=attach)
    opts.set_parameter_source("host", host.parameters)
    opts.set_parameter_source("s0", seed.parameters)
    create = CommandType.COMMAND_TYPE_CREATE_SEED
    assert opts.apply_optimizer_command(_cmd(create, "s0", parameters=given))
    init = CommandType.COMMAND_TYPE_INITIALIZE_HOST
    assert opts.apply_optimizer_command(_cmd(init, parameters=given))
    for oid in ("s0", "host"):
        assert tuple(opts.optimizer(oid).param_groups[0]["betas"]) == pytest.approx(betas)


@pytest.mark.parametrize("norm", [-1.0, math.nan], ids=repr)
def test_a_step_command_with_a_bad_clip_norm_is_rejected_unstepped(norm: float) -> None:
    """The handler refuses such a norm on the wire; an in-process command that carries one is
    rejected too, rather than stepping unclipped."""
    host, _ = models()
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("host", host.parameters)
    assert opts.apply_optimizer_command(_cmd(CommandType.COMMAND_TYPE_INITIALIZE_HOST))
    fill_grads(host, scale=100.0)
    before = [p.detach().clone() for p in host.parameters()]
    step = _cmd(CommandType.COMMAND_TYPE_STEP, "host", grad_clip_norm=norm, learning_rate=0.5)
    assert opts.apply_optimizer_command(step) is False
    assert all(torch.equal(p, b) for p, b in zip(host.parameters(), before, strict=True))
    assert not opts.optimizer("host").state and not opts.last_grad_norm
    assert opts.optimizer("host").param_groups[0]["lr"] == 1e-3  # the command's lr not set either


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_step_command_skipped_for_a_non_finite_norm_changes_nothing(bad: float) -> None:
    """Refused as skipped, it kept the lr it carried and had scaled the gradients in place (by
    0 or NaN) before the skip: a refused command changes nothing."""
    host, _ = models()
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("host", host.parameters)
    init = _cmd(CommandType.COMMAND_TYPE_INITIALIZE_HOST, learning_rate=0.05)
    assert opts.apply_optimizer_command(init)
    opts.optimizer("host").add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.3})
    fill_grads(host)
    host.weight.grad[0, 0] = bad
    grads = [p.grad.clone() for p in host.parameters()]
    step = _cmd(CommandType.COMMAND_TYPE_STEP, "host", grad_clip_norm=1.0, learning_rate=0.2)
    assert opts.apply_optimizer_command(step) is False
    assert [g["lr"] for g in opts.optimizer("host").param_groups] == [0.05, 0.3]
    for p, before in zip(host.parameters(), grads, strict=True):
        assert torch.equal(p.grad.isnan(), before.isnan())
        assert torch.equal(p.grad.nan_to_num(), before.nan_to_num())
    fill_grads(host)  # a finite step takes the command's lr (the added group: its ratio)
    assert opts.apply_optimizer_command(step) is True
    assert [g["lr"] for g in opts.optimizer("host").param_groups] == pytest.approx([0.2, 1.2])


@pytest.mark.parametrize("tensor", [False, True], ids=["float", "tensor"])
def test_a_step_commands_lr_keeps_each_groups_ratio_to_the_first(tensor: bool) -> None:
    """A layer unfrozen at a tenth of the base lr (a group of its own): a controller's STEP set
    every group to its lr, and the tenth was gone for good. Each group keeps its ratio to the
    first; a tensor lr stays a tensor; a first group at 0 gives every group the command's."""
    host, _ = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.set_parameter_source("host", host.parameters)
    assert opts.apply_optimizer_command(
        _cmd(CommandType.COMMAND_TYPE_INITIALIZE_HOST, learning_rate=0.05)
    )
    groups = opts.optimizer("host").param_groups
    groups[0]["lr"] = torch.tensor(0.05) if tensor else 0.05
    opts.optimizer("host").add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.005})
    step = _cmd(CommandType.COMMAND_TYPE_STEP, "host", learning_rate=0.2)
    assert opts.apply_optimizer_command(step) is True
    assert [float(g["lr"]) for g in groups] == pytest.approx([0.2, 0.02])
    assert isinstance(groups[0]["lr"], torch.Tensor) is tensor
    assert not isinstance(groups[1]["lr"], torch.Tensor)
    groups[0]["lr"] = 0.0
    assert opts.apply_optimizer_command(step) is True
    assert [float(g["lr"]) for g in groups] == [0.2, 0.2]
    # The first group's lr is the command's exactly (``lr * old / base`` rounded it twice).
    assert step_lrs([{"lr": 1e-4}, {"lr": 1e-5}], 1e-4)[0] == 1e-4


def test_a_step_command_that_raises_leaves_the_lr_as_it_was() -> None:
    """Adam refuses a sparse gradient: the step raises, and the lr the command carried, set
    before the step, is put back (the manager refuses the command, naming the error)."""
    host = nn.Embedding(10, 4, sparse=True)
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.Adam)
    opts.set_parameter_source("host", host.parameters)
    assert opts.apply_optimizer_command(
        _cmd(CommandType.COMMAND_TYPE_INITIALIZE_HOST, learning_rate=0.05)
    )
    host(torch.tensor([1, 2])).sum().backward()
    step = _cmd(CommandType.COMMAND_TYPE_STEP, "host", grad_clip_norm=1.0, learning_rate=0.2)
    with pytest.raises(RuntimeError, match="sparse"):
        opts.apply_optimizer_command(step)
    assert [g["lr"] for g in opts.optimizer("host").param_groups] == [0.05]
