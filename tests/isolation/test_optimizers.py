"""IsolatedOptimizerManager: disjoint registration, isolated steps, clipping, commands."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kasmina.control.commands import KasminaCommand
from kasmina.errors import ParameterOverlapError
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.kd.teacher import CheckpointedTeacher
from kasmina.leyline import AdaptationCommand, CommandType, OptimizerCommand
from kasmina.utils.state_io import clone_state
from tests.ops.tolerances import tol


def _models(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(4, 4), nn.Linear(4, 4)


def _fill_grads(*modules: nn.Module, scale: float = 1.0) -> None:
    for module in modules:
        for p in module.parameters():
            p.grad = torch.randn_like(p) * scale


# ---------------------------------------------------------------- registration


def test_overlap_with_host_is_rejected_and_nothing_registered():
    host, seed = _models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    with pytest.raises(ParameterOverlapError, match="already owned by 'host'"):
        opts.create_seed_optimizer("s0", [seed.weight, host.bias])
    assert opts.seed_ids == []
    assert opts.owner_of(seed.weight) is None
    opts.create_seed_optimizer("s0", seed.parameters())  # the clean set is still accepted
    assert opts.owner_of(seed.weight) == "s0"


def test_overlap_between_seeds_is_rejected():
    host, seed = _models()
    opts = IsolatedOptimizerManager()
    opts.create_seed_optimizer("a", seed.parameters())
    with pytest.raises(ParameterOverlapError, match="'a'"):
        opts.create_seed_optimizer("b", [seed.weight])
    with pytest.raises(ParameterOverlapError):
        opts.initialize_host([*host.parameters(), seed.bias])
    assert not opts.has_host


def test_overlap_is_checked_where_the_memory_is_now():
    """``host.half()`` after the host optimizer was built swaps each parameter's storage: an
    alias of the new storage is still the host's memory."""
    host = nn.Linear(4, 4)
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(list(host.parameters()), lr=0.1)
    host.half()
    with pytest.raises(ParameterOverlapError, match="shares memory"):
        opts.create_seed_optimizer("s", [nn.Parameter(host.weight.data)], lr=0.1)
    assert opts.seed_ids == []


def test_shared_memory_is_overlap_but_disjoint_slices_are_not():
    host, _ = _models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    with pytest.raises(ParameterOverlapError, match="shares memory"):
        opts.create_seed_optimizer("alias", [nn.Parameter(host.weight.data)])
    with pytest.raises(ParameterOverlapError, match="shares memory"):
        opts.create_seed_optimizer("view", [nn.Parameter(host.weight.data[1])])
    flat = torch.zeros(10)
    left, right = nn.Parameter(flat[:5]), nn.Parameter(flat[5:])
    opts.create_seed_optimizer("left", [left])
    opts.create_seed_optimizer("right", [right])
    assert opts.seed_ids == ["left", "right"]


def test_bad_registrations_give_clear_errors():
    host, seed = _models()
    opts = IsolatedOptimizerManager()
    with pytest.raises(ValueError, match="leaf"):
        opts.initialize_host([host.weight * 2])
    with pytest.raises(ValueError, match="at least one"):
        opts.initialize_host([])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        opts.initialize_host([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="learning rate"):
        opts.initialize_host(host.parameters(), lr=0.0)
    opts.initialize_host(host.parameters())
    with pytest.raises(ValueError, match="already initialized"):
        opts.initialize_host(seed.parameters())
    for bad in ("", "host", "teacher"):
        with pytest.raises(ValueError, match="invalid seed id"):
            opts.create_seed_optimizer(bad, seed.parameters())
    opts.create_seed_optimizer("s", seed.parameters())
    with pytest.raises(ValueError, match="already has"):
        opts.create_seed_optimizer("s", [nn.Parameter(torch.zeros(2))])
    with pytest.raises(KeyError, match="no optimizer 'nope'"):
        opts.step("nope")


def test_teacher_params_are_frozen_and_never_optimizable():
    host, seed = _models()
    teacher = nn.Linear(4, 4)
    opts = IsolatedOptimizerManager()
    assert opts.register_teacher_params(teacher.parameters()) == 20
    assert all(not p.requires_grad for p in teacher.parameters())
    assert opts.owner_of(teacher.weight) == "teacher"
    assert opts.register_teacher_params(teacher.parameters()) == 0  # idempotent
    assert opts.teacher_param_count == 20
    with pytest.raises(ParameterOverlapError, match="teacher"):
        opts.initialize_host([*host.parameters(), teacher.weight])
    with pytest.raises(ParameterOverlapError, match="teacher"):
        opts.create_seed_optimizer("s", [teacher.bias])
    opts.initialize_host(host.parameters())
    with pytest.raises(ParameterOverlapError):
        opts.register_teacher_params([host.weight])
    assert host.weight.requires_grad  # the rejected registration froze nothing


def test_checkpointed_teacher_params_are_refused_even_unregistered():
    teacher = CheckpointedTeacher(nn.Linear(4, 4), dtype=torch.float32)
    opts = IsolatedOptimizerManager()
    with pytest.raises(ParameterOverlapError, match="belongs to a teacher"):
        opts.create_seed_optimizer("s", list(teacher.teacher_parameters()))
    assert opts.register_teacher_params(teacher.teacher_parameters()) == 20


# ---------------------------------------------------------------- stepping


def test_seed_step_never_moves_host_and_vice_versa():
    host, seed = _models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=0.1)
    _fill_grads(host, seed)
    host_before = [p.clone() for p in host.parameters()]
    seed_before = [p.clone() for p in seed.parameters()]

    assert opts.step("s0")
    assert all(torch.equal(a, b) for a, b in zip(host.parameters(), host_before, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(seed.parameters(), seed_before, strict=True))

    seed_after = [p.clone() for p in seed.parameters()]
    assert opts.step("host")
    assert all(torch.equal(a, b) for a, b in zip(seed.parameters(), seed_after, strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(host.parameters(), host_before, strict=True))


@pytest.mark.parametrize("backend", ["reference_backend", "triton_backend"])
@pytest.mark.parametrize("scale", [10.0, 1e-3])
def test_clipping_equals_true_global_norm_clip(request, backend, scale):
    """Mixed fp32/bf16 grads (two dtypes, one launch each) against a float64 oracle."""
    request.getfixturevalue(backend)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    model[1].to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    model[0].bias.grad = None
    original = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    true_norm = sum(g.double().square().sum() for g in original.values()).sqrt()
    coef = min(1.0, 0.5 / (float(true_norm) + 1e-6))

    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(model.parameters(), lr=1.0)
    total = opts.clip_grad_norm("host", 0.5)
    torch.testing.assert_close(total.double(), true_norm, rtol=1e-5, atol=0)
    assert model[0].bias.grad is None
    for p in model.parameters():
        if p.grad is not None:
            expected = (original[id(p)].double() * coef).to(p.dtype)
            torch.testing.assert_close(p.grad, expected, **tol(p.dtype))
            if coef == 1.0:  # under the limit: grads untouched, bit for bit
                assert torch.equal(p.grad, original[id(p)])


def test_clipped_step_matches_torch_clip_grad_norm():
    torch.manual_seed(4)
    ours, theirs = nn.Linear(6, 5), nn.Linear(6, 5)
    theirs.load_state_dict(ours.state_dict())
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        a.grad = torch.randn_like(a) * 3
        b.grad = a.grad.clone()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(ours.parameters(), lr=0.1)
    assert opts.step("host", grad_clip_norm=1.0)
    expected_norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    torch.optim.SGD(theirs.parameters(), lr=0.1).step()
    torch.testing.assert_close(opts.last_grad_norm["host"], expected_norm, **tol(torch.float32))
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, **tol(torch.float32))


def test_non_finite_norm_skips_the_step():
    host, _ = _models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1)
    _fill_grads(host)
    host.weight.grad[0, 0] = float("nan")
    before = [p.clone() for p in host.parameters()]
    assert opts.step("host", grad_clip_norm=1.0) is False
    assert all(torch.equal(a, b) for a, b in zip(host.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="max_norm"):
        opts.clip_grad_norm("host", -1.0)


def test_reset_state_and_remove_seed():
    host, seed = _models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    _fill_grads(seed)
    opts.step("s0")
    assert len(opts.optimizer("s0").state) == 2
    opts.reset_state("s0")
    assert len(opts.optimizer("s0").state) == 0
    opts.remove_seed("s0")
    assert opts.seed_ids == [] and opts.owner_of(seed.weight) is None
    opts.create_seed_optimizer("s1", seed.parameters())  # released params can be re-registered
    with pytest.raises(ValueError, match="cannot remove the host"):
        opts.remove_seed("host")


def test_promote_seed_moves_params_and_state_into_host():
    host, seed = _models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=1e-3)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=5e-3)
    _fill_grads(seed)
    opts.step("s0")
    moments = opts.optimizer("s0").state[seed.weight]["exp_avg"].clone()

    opts.promote_seed("s0")
    assert opts.optimizer_ids == ["host"]
    host_opt = opts.optimizer("host")
    assert len(host_opt.param_groups) == 2
    assert host_opt.param_groups[1]["lr"] == 5e-3
    assert torch.equal(host_opt.state[seed.weight]["exp_avg"], moments)
    assert opts.owner_of(seed.weight) == "host"
    with pytest.raises(ParameterOverlapError, match="'host'"):
        opts.create_seed_optimizer("again", [seed.bias])

    _fill_grads(host, seed)
    before = seed.weight.clone()
    opts.step("host", grad_clip_norm=1.0)
    assert not torch.equal(seed.weight, before)
    with pytest.raises(KeyError):
        opts.step("s0")


def test_promote_into_a_different_optimizer_class_keeps_the_seed_lr():
    host, seed = _models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=0.1, optimizer_cls=torch.optim.SGD)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=0.02)
    opts.promote_seed("s0")
    group = opts.optimizer("host").param_groups[1]
    assert group["lr"] == 0.02 and "betas" not in group


def test_state_dict_roundtrip_and_layout_check():
    host, seed = _models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    _fill_grads(host, seed)
    opts.step("host")
    opts.step("s0")
    saved = clone_state(opts.state_dict())  # like torch, state_dict() holds live references
    exp_avg = opts.optimizer("host").state[host.weight]["exp_avg"].clone()
    _fill_grads(host, seed)
    opts.step("host")
    opts.load_state_dict(saved)
    assert torch.equal(opts.optimizer("host").state[host.weight]["exp_avg"], exp_avg)
    opts.promote_seed("s0")
    with pytest.raises(ValueError, match="optimizer state is for"):
        opts.load_state_dict(saved)
    with pytest.raises(ValueError, match="format"):
        opts.load_state_dict({"format": 99})


# ---------------------------------------------------------------- commands


def _cmd(kind: int, oid: str = "", **fields) -> KasminaCommand:
    """A verified optimizer command, as the handler hands it on (no signature to check here)."""
    params = fields.pop("parameters", {})
    cmd = OptimizerCommand(command_type=kind, optimizer_id=oid, **fields)
    cmd.parameters.update(params)
    return KasminaCommand("cmd", "optimizer", 0, 1.0, optimizer=cmd)


def test_every_optimizer_command_type():
    host, seed = _models()
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

    _fill_grads(host, seed, scale=100.0)
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


def test_wire_messages_are_not_accepted_as_commands():
    """Only a verified command gets in: a parsed message carries no checked signature."""
    host, _ = _models()
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
    host, _ = _models()
    opts = IsolatedOptimizerManager()
    opts.set_parameter_source("host", host.parameters)
    assert opts.apply_optimizer_command(cmd) is False
    assert opts.optimizer_ids == []
