"""IsolatedOptimizerManager: disjoint registration, isolated steps, clipping, promotion,
saved state. Its optimizer commands: test_optimizer_commands.py."""

from __future__ import annotations

import gc
import logging
import math
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn

import kasmina.isolation.ownership as ownership_module
import kasmina.utils.memory as memory_module
from kasmina.errors import ParameterOverlapError
from kasmina.isolation.optimizers import IsolatedOptimizerManager
from kasmina.isolation.stepping import clip_gradients
from kasmina.kd.teacher import CheckpointedTeacher
from kasmina.utils.state_io import clone_state
from tests.isolation.helpers import fill_grads, models
from tests.ops.tolerances import tol

# ---------------------------------------------------------------- registration


def test_overlap_with_host_is_rejected_and_nothing_registered():
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    with pytest.raises(ParameterOverlapError, match="already owned by 'host'"):
        opts.create_seed_optimizer("s0", [seed.weight, host.bias])
    assert opts.seed_ids == []
    assert opts.owner_of(seed.weight) is None
    opts.create_seed_optimizer("s0", seed.parameters())  # the clean set is still accepted
    assert opts.owner_of(seed.weight) == "s0"


class SwitchingId(str):
    """A seed id whose comparison runs ``on_compare`` once: another thread's command landing
    between two ids of a reader's walk, deterministically."""

    on_compare = None

    def __ne__(self, other: object) -> bool:
        hook, type(self).on_compare = type(self).on_compare, None
        if hook is not None:
            hook()
        return str.__ne__(self, other)

    __hash__ = str.__hash__


def test_seed_ids_read_on_another_thread_never_meet_a_registration() -> None:
    """An exporter reading ``seed_ids`` walked the live dict while the training thread's
    command created (or removed) a seed optimizer, and raised "dictionary changed size during
    iteration". It reads the ids copied at one moment now."""
    host, seed = models()
    other = torch.nn.Linear(4, 4)
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer(SwitchingId("s0"), seed.parameters())
    SwitchingId.on_compare = lambda: opts.create_seed_optimizer("s1", other.parameters())
    assert opts.seed_ids == ["s0"]  # the ids when it was read
    assert opts.seed_ids == ["s0", "s1"]
    SwitchingId.on_compare = lambda: opts.remove_seed("s1")
    assert opts.seed_ids == ["s0", "s1"] and opts.seed_ids == ["s0"]


def test_step_records_read_on_another_thread_are_copies() -> None:
    """``last_grad_norm``, ``skipped_steps`` and ``failed_steps`` were the live dicts: an
    exporter walking one while a step recorded an optimizer's first norm, skip or failure
    raised "dictionary changed size during iteration". Each read is a copy now."""
    host, seed = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=0.1)
    fill_grads(host, seed)
    host.weight.grad[0, 0] = float("nan")
    assert opts.step_many(["host"], grad_clip_norm=1.0) == [False]  # the host's norm, skip
    walked = [oid for oid in opts.last_grad_norm if opts.step("s0", 1.0)]  # s0's first norm
    assert walked == ["host"] and set(opts.last_grad_norm) == {"host", "s0"}
    seed.weight.grad[0, 0] = float("nan")
    walked = [oid for oid in opts.skipped_steps if not opts.step("s0", 1.0)]  # s0's first skip
    assert walked == ["host"] and opts.skipped_steps == {"host": 1, "s0": 1}

    def raising() -> None:
        raise RuntimeError("step exploded")

    opts.optimizer("s0").step = raising  # type: ignore[method-assign]
    assert opts.step("s0") is False
    opts.create_seed_optimizer("s1", torch.nn.Linear(4, 4).parameters(), lr=0.1)
    opts.optimizer("s1").step = raising  # type: ignore[method-assign]
    walked = [oid for oid in opts.failed_steps if opts.step("s1") is False]
    assert walked == ["s0"] and opts.failed_steps["s1"] == (1, "RuntimeError: step exploded")
    opts.failed_steps["s1"] = (0, "")  # a copy: the manager's record is not written
    assert opts.failed_steps["s1"][0] == 1


def test_overlap_between_seeds_is_rejected():
    host, seed = models()
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


def test_repeated_registrations_read_the_new_parameters_and_find_memory_moved_since(
    monkeypatch: pytest.MonkeyPatch,
):
    """Every registration read the byte range of every owned parameter again (O(owned) each,
    quadratic over a run of many seeds). The ranges are kept and read again only for a tensor
    whose signature moved: a ``.data`` swapped after they were kept, or grown in place from
    the same address, is still checked where its memory is now."""
    gc.collect()  # an earlier test's teacher, dropped unclosed, holds nothing whose reads count
    host = nn.Sequential(*(nn.Linear(2, 2) for _ in range(50)))
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(list(host.parameters()), lr=0.1)
    reads: list[torch.Tensor] = []
    span = memory_module.byte_span

    def counting(t: torch.Tensor):
        reads.append(t)
        return span(t)

    monkeypatch.setattr(memory_module, "byte_span", counting)
    monkeypatch.setattr(ownership_module, "byte_span", counting, raising=False)
    seeds = [nn.Linear(2, 2) for _ in range(10)]
    for i, seed in enumerate(seeds):
        opts.create_seed_optimizer(f"s{i}", seed.parameters(), lr=0.1)
    count = len(reads)
    assert count <= 2 * 2 * len(seeds)  # a check's and a claim's read of each new one
    host_ids = {id(p) for p in host.parameters()}
    assert not [t for t in reads if id(t) in host_ids]
    host[0].weight.data = torch.zeros(2, 2)  # new storage, after the ranges were kept
    with pytest.raises(ParameterOverlapError, match="shares memory with a parameter of 'host'"):
        opts.create_seed_optimizer("alias", [nn.Parameter(host[0].weight.data)], lr=0.1)
    base = torch.zeros(8)
    grown = nn.Parameter(base[:4])
    opts.create_seed_optimizer("grown", [grown], lr=0.1)
    opts.create_seed_optimizer("tail", [nn.Parameter(base[6:])], lr=0.1)  # disjoint
    opts.remove_seed("tail")
    grown.data = base  # the same address, twice the bytes
    with pytest.raises(ParameterOverlapError, match="of 'grown'"):
        opts.create_seed_optimizer("tail", [nn.Parameter(base[6:])], lr=0.1)
    assert "alias" not in opts.seed_ids and "tail" not in opts.seed_ids


def test_shared_memory_is_overlap_but_disjoint_slices_are_not():
    host, _ = models()
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
    host, seed = models()
    opts = IsolatedOptimizerManager()
    with pytest.raises(ValueError, match="leaf"):
        opts.initialize_host([host.weight * 2])
    with pytest.raises(ValueError, match="host has no trainable parameters"):
        opts.initialize_host([])
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        opts.initialize_host([torch.zeros(3, dtype=torch.float64, requires_grad=True)])
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


@pytest.mark.parametrize("lr", [math.inf, math.nan, -0.1, True], ids=repr)
def test_a_learning_rate_not_finite_or_not_above_0_is_refused_before_anything_changes(lr) -> None:
    """``initialize_host``, ``create_seed_optimizer`` and ``set_lr`` take a finite rate > 0:
    an infinite one made every weight the next step reached inf, a bool stood for 1."""
    host, seed = models()
    opts = IsolatedOptimizerManager()
    with pytest.raises(ValueError, match="learning rate"):
        opts.initialize_host(host.parameters(), lr=lr)
    opts.initialize_host(host.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        opts.create_seed_optimizer("s", seed.parameters(), lr=lr)
    assert opts.seed_ids == [] and opts.owner_of(seed.weight) is None
    with pytest.raises(ValueError, match="learning rate"):
        opts.set_lr("host", lr)
    assert opts.optimizer("host").param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float64])
def test_a_frozen_parameter_of_any_dtype_is_claimed_and_never_stepped(dtype: torch.dtype):
    """A seed's frozen mask in a dtype clipping does not read was refused at registration; it
    has no gradient, so it is claimed with the rest and left alone by the clipped step."""
    _, seed = models()
    mask = nn.Parameter(torch.tensor([1, 0, 1, 1]).to(dtype), requires_grad=False)
    opts = IsolatedOptimizerManager()
    opts.create_seed_optimizer("s", [*seed.parameters(), mask], lr=0.1)
    assert opts.owner_of(mask) == "s"
    with pytest.raises(ParameterOverlapError):
        opts.create_seed_optimizer("t", [nn.Parameter(mask.data, requires_grad=False)])
    weight = seed.weight.detach().clone()
    fill_grads(seed)
    assert opts.step("s", grad_clip_norm=1.0)
    assert not torch.equal(seed.weight, weight)
    assert torch.equal(mask, torch.tensor([1, 0, 1, 1]).to(dtype)) and mask.grad is None


def test_teacher_params_are_frozen_and_never_optimizable():
    host, seed = models()
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
    assert opts.teacher_param_count == 20  # and let go of nothing


def test_the_parameter_count_events_count_elements() -> None:
    """``optimizer_created``, ``seed_optimizer_created`` and ``seed_promoted`` carried the
    number of tensors (a 4x4 Linear: 2) and ``teacher_params_registered`` the number of
    elements (20): one documented "parameter count", two units."""
    from kasmina.utils.telemetry import MemorySink, TelemetryReporter

    host, seed = models()
    sink = MemorySink()
    opts = IsolatedOptimizerManager(telemetry=TelemetryReporter(sinks=[sink]))
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    opts.register_teacher_params(nn.Linear(4, 4).parameters())
    opts.promote_seed("s0")
    counts = {name: event.value for name in (
        "optimizer_created", "seed_optimizer_created", "teacher_params_registered",
        "seed_promoted",
    ) for event in sink.events(name)}  # fmt: skip
    host_n = sum(p.numel() for p in host.parameters())
    seed_n = sum(p.numel() for p in seed.parameters())
    assert counts == {
        "optimizer_created": host_n, "seed_optimizer_created": seed_n,
        "teacher_params_registered": 20, "seed_promoted": seed_n,
    }  # fmt: skip


def test_a_replaced_teacher_is_let_go() -> None:
    """One teacher at a time: registering another (or pointing the teacher source at one)
    releases the old one's parameters, which a run that refreshes its teacher every epoch
    would otherwise keep alive, one whole teacher per swap."""
    opts = IsolatedOptimizerManager()
    first, second = nn.Linear(4, 4), nn.Linear(4, 3)
    gone = weakref.ref(first.weight)
    assert opts.register_teacher_params(first.parameters()) == 20
    assert opts.register_teacher_params(second.parameters()) == 15
    assert opts.teacher_param_count == 15 and opts.owner_of(first.weight) is None
    del first
    gc.collect()
    assert gone() is None
    opts.set_parameter_source("teacher", lambda: [])  # a new teacher, not registered yet
    assert opts.teacher_param_count == 0 and opts.owner_of(second.weight) is None


def test_checkpointed_teacher_params_are_refused_even_unregistered():
    teacher = CheckpointedTeacher(nn.Linear(4, 4), dtype=torch.float32)
    opts = IsolatedOptimizerManager()
    with pytest.raises(ParameterOverlapError, match="belongs to a teacher"):
        opts.create_seed_optimizer("s", list(teacher.teacher_parameters()))
    assert opts.register_teacher_params(teacher.teacher_parameters()) == 20


def test_registrations_beside_a_held_teacher_read_its_ranges_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every registration (every GERMINATE) read the byte range of every parameter a live
    teacher holds again. They are kept until the holds change, each read again only when its
    signature moved: a teacher converted in place is still found where its memory is now, and
    one closed lets its memory go."""
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(20)))
    teacher = CheckpointedTeacher(model, dtype=torch.float32, copy_model=False)
    held = {id(p) for p in model.parameters()}
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    reads: list[int] = []
    span = memory_module.byte_span

    def counting(t: torch.Tensor):
        reads.append(id(t))
        return span(t)

    monkeypatch.setattr(memory_module, "byte_span", counting)
    monkeypatch.setattr(ownership_module, "byte_span", counting, raising=False)
    for i in range(10):
        opts.create_seed_optimizer(f"s{i}", nn.Linear(2, 2).parameters(), lr=0.1)
    assert sorted(r for r in reads if r in held) == sorted(held)  # each once, at the first
    model[0].weight.data = torch.zeros(2, 2)  # new storage, after the ranges were kept
    with pytest.raises(ParameterOverlapError, match="shares memory with a teacher's parameter"):
        opts.create_seed_optimizer("alias", [nn.Parameter(model[0].weight.data)], lr=0.1)
    assert "alias" not in opts.seed_ids
    teacher.close()  # the holds changed: its memory is free
    opts.create_seed_optimizer("alias", [nn.Parameter(model[0].weight.data)], lr=0.1)


# ---------------------------------------------------------------- stepping


def test_seed_step_never_moves_host_and_vice_versa():
    host, seed = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=0.1)
    fill_grads(host, seed)
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
@pytest.mark.parametrize("scale", [10.0, 1e-3, 1e19, 1e-25])
def test_clipping_equals_true_global_norm_clip(request, backend, scale):
    """Mixed fp32/bf16 grads (two dtypes, one launch each) against a float64 oracle. At 1e19
    the squares of the per-tensor norms overflow fp32 (the total read inf, the step skipped as
    non-finite, nothing clipped); at 1e-25 they underflow (the total read 0)."""
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
    host, _ = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1)
    fill_grads(host)
    host.weight.grad[0, 0] = float("nan")
    before = [p.clone() for p in host.parameters()]
    assert opts.step("host", grad_clip_norm=1.0) is False
    assert all(torch.equal(a, b) for a, b in zip(host.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="max_norm"):
        opts.clip_grad_norm("host", -1.0)


def test_repeated_non_finite_skips_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """A diverged run skips every step: the first and every 1000th skip per optimizer is a
    WARNING, the rest DEBUG, and ``skipped_steps`` counts them all."""
    host, seed = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=0.1)
    fill_grads(host, seed)
    host.weight.grad[0, 0] = seed.weight.grad[0, 0] = float("nan")
    with caplog.at_level(logging.DEBUG, logger="kasmina.isolation.optimizers"):
        for _ in range(2000):
            assert opts.step_many(["host", "s0"], grad_clip_norm=1.0) == [False, False]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 6 and sum("non-finite" in m for m in caplog.messages) == 4000
    assert sum("host" in m for m in warned) == 3 and "(2000 skipped so far)" in warned[-1]
    assert opts.skipped_steps == {"host": 2000, "s0": 2000}


# A negative or NaN norm used to read as "clipping off" (a step unclipped, no non-finite skip),
# a bool as a norm of 1; a string, a list or a tensor failed, or not, deep in the clipping.
BAD_CLIP_NORMS = [-1.0, -1e-9, math.nan, -math.inf, "1", True, [1.0], torch.tensor(1.0)]


def _clipping_pair() -> tuple[IsolatedOptimizerManager, list[nn.Parameter]]:
    """A host and a seed optimizer (Adam: a step leaves state) with gradients a clip bites."""
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    fill_grads(host, seed, scale=100.0)
    return opts, [*host.parameters(), *seed.parameters()]


@pytest.mark.parametrize("norm", BAD_CLIP_NORMS, ids=repr)
def test_a_bad_clip_norm_is_refused_before_anything_changes(norm: object) -> None:
    opts, params = _clipping_pair()
    weights = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match="grad_clip_norm must be"):
        opts.step_many(["host", "s0"], norm)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad_clip_norm must be"):
        opts.step("s0", norm)  # type: ignore[arg-type]
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))  # unclipped
    assert not opts.last_grad_norm and not opts.skipped_steps
    assert not opts.optimizer("host").state and not opts.optimizer("s0").state  # never stepped
    assert opts.step_many(["host", "s0"], 1.0) == [True, True]  # the same gradients step now


@pytest.mark.parametrize("off", [None, 0, 0.0], ids=repr)
def test_no_clipping_is_zero_or_none(off: object) -> None:
    opts, params = _clipping_pair()
    grads = [p.grad.clone() for p in params]
    assert opts.step_many(["host", "s0"], off) == [True, True]  # type: ignore[arg-type]
    assert opts.step("host", off)  # type: ignore[arg-type]
    assert not opts.last_grad_norm  # never measured, so never clipped
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))


def test_an_infinite_clip_norm_skips_a_non_finite_step_without_clipping() -> None:
    host, _ = models()
    opts = IsolatedOptimizerManager(default_optimizer_cls=torch.optim.SGD)
    opts.initialize_host(host.parameters(), lr=0.1)
    fill_grads(host, scale=100.0)
    before = [p.detach().clone() for p in host.parameters()]
    grads = [p.grad.clone() for p in host.parameters()]
    assert opts.step("host", math.inf)
    assert torch.isfinite(opts.last_grad_norm["host"])  # measured, for the skip
    for p, was, g in zip(host.parameters(), before, grads, strict=True):
        assert torch.equal(p.grad, g)  # not scaled
        torch.testing.assert_close(p, was - 0.1 * g, **tol(torch.float32))
    fill_grads(host)
    host.weight.grad[0, 0] = math.inf
    before = [p.detach().clone() for p in host.parameters()]
    assert opts.step_many(["host"], math.inf) == [False]
    assert all(torch.equal(p, b) for p, b in zip(host.parameters(), before, strict=True))
    assert opts.skipped_steps == {"host": 1}


def test_reset_state_and_remove_seed():
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    fill_grads(seed)
    opts.step("s0")
    assert len(opts.optimizer("s0").state) == 2
    opts.reset_state("s0")
    assert len(opts.optimizer("s0").state) == 0
    opts.remove_seed("s0")
    assert opts.seed_ids == [] and opts.owner_of(seed.weight) is None
    opts.create_seed_optimizer("s1", seed.parameters())  # released params can be re-registered
    with pytest.raises(ValueError, match="cannot remove the host"):
        opts.remove_seed("host")


def _ids(params) -> list[int]:
    return [id(p) for p in params]


def _namer(**modules: nn.Module) -> Callable[[list[torch.Tensor]], list[str]]:
    """``take_host_groups``' names: each parameter's name in a model made of ``modules``."""
    names = {id(p): name for name, p in nn.ModuleDict(modules).named_parameters()}
    return lambda params: [names[id(p)] for p in params]


def test_promote_seed_moves_params_and_state_into_the_host_group():
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=1e-3)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=5e-3)
    fill_grads(seed)
    opts.step("s0")
    moments = opts.optimizer("s0").state[seed.weight]["exp_avg"].clone()

    assert opts.promote_seed("s0") == 0
    assert opts.optimizer_ids == ["host"]
    host_opt = opts.optimizer("host")
    # No new group: the seed's params join the host's and train at its lr from now on.
    assert len(host_opt.param_groups) == 1
    group = host_opt.param_groups[0]
    assert _ids(group["params"]) == _ids([*host.parameters(), *seed.parameters()])
    assert group["lr"] == 1e-3
    assert torch.equal(host_opt.state[seed.weight]["exp_avg"], moments)
    assert int(host_opt.state[seed.weight]["step"]) == 1  # the seed's own step count
    assert opts.owner_of(seed.weight) == "host"
    assert {k: (g, _ids(ps)) for k, (g, ps) in opts.promoted().items()} == {
        "s0": (0, _ids(seed.parameters()))
    }
    with pytest.raises(ParameterOverlapError, match="'host'"):
        opts.create_seed_optimizer("again", [seed.bias])

    fill_grads(host, seed)
    before = seed.weight.clone()
    opts.step("host", grad_clip_norm=1.0)
    assert not torch.equal(seed.weight, before)
    with pytest.raises(KeyError):
        opts.step("s0")


def test_promote_into_a_different_optimizer_class_takes_the_host_group_without_state():
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=0.1, optimizer_cls=torch.optim.SGD)
    opts.create_seed_optimizer("s0", seed.parameters(), lr=0.02)
    fill_grads(seed)
    opts.step("s0")
    opts.promote_seed("s0")
    host_opt = opts.optimizer("host")
    assert len(host_opt.param_groups) == 1 and host_opt.param_groups[0]["lr"] == 0.1
    assert "betas" not in host_opt.param_groups[0] and seed.weight not in host_opt.state


@pytest.mark.parametrize(
    ("cls", "settings"),
    [
        (torch.optim.Adam, {"amsgrad": True}),  # needs max_exp_avg_sq
        (torch.optim.RMSprop, {"momentum": 0.9}),  # needs momentum_buffer
        (torch.optim.RMSprop, {"centered": True}),  # needs grad_avg
    ],
)
def test_a_seed_state_its_host_group_cannot_step_with_is_left_behind(cls, settings):
    """Promotion carried a seed's state over as it was (same class) into a group whose settings
    need state the seed's optimizer never made: every host step from then on raised KeyError
    (the first group already stepped). Now a state carries over only where it fits the group
    it joins; one that does not is left behind, the promotion whole, and the host steps."""
    host, seed = models()
    other, third = models(1)
    opts = IsolatedOptimizerManager()
    host_opt = opts.initialize_host(host.parameters(), lr=0.01, optimizer_cls=cls)
    host_opt.add_param_group({"params": list(other.parameters()), "lr": 0.02, **settings})
    opts.take_host_groups(_namer(host=host, other=other))  # the manager's step does this
    opts.create_seed_optimizer("s0", seed.parameters(), optimizer_cls=cls)
    opts.create_seed_optimizer("s1", third.parameters(), optimizer_cls=cls)
    fill_grads(seed, third)
    opts.step_many(["s0", "s1"])
    fits = {k: v.clone() for k, v in opts.optimizer("s1").state[third.weight].items()}
    assert opts.promote_seed("s0", near=other.parameters()) == 1  # the unfrozen layer's group
    assert opts.promote_seed("s1", group=0) == 0  # settings as the seeds': carried over
    state = host_opt.state
    assert all(torch.equal(state[third.weight][k], v) for k, v in fits.items())
    assert opts.optimizer_ids == ["host"] and len(host_opt.param_groups[1]["params"]) == 4
    for _ in range(2):
        fill_grads(host, other, seed, third)
        before = host.weight.detach().clone(), seed.weight.detach().clone()
        assert opts.step("host")  # raised KeyError at every step
        assert not torch.equal(before[0], host.weight) and not torch.equal(before[1], seed.weight)
    assert set(state[seed.weight]) == set(state[other.weight])  # made as the group makes it
    assert int(state[seed.weight]["step"]) == 2 and int(state[third.weight]["step"]) == 3


def test_promote_joins_the_group_of_the_given_parameters():
    """The manager passes the slot's host layer: the seed joins the group that holds it (the
    first group when none or several do); an explicit group index wins."""
    host, seed = models()
    other, third = models(1)
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=1e-3)
    opts.optimizer("host").add_param_group({"params": list(other.parameters()), "lr": 0.1})
    opts.take_host_groups(_namer(host=host, other=other))  # the manager's step does this
    opts.create_seed_optimizer("s0", seed.parameters())
    assert opts.promote_seed("s0", near=other.parameters()) == 1
    groups = opts.optimizer("host").param_groups
    assert len(groups) == 2 and _ids(groups[1]["params"][2:]) == _ids(seed.parameters())
    opts.create_seed_optimizer("s1", [third.weight])
    assert opts.promote_seed("s1", near=[host.weight, other.weight]) == 0  # both groups
    opts.create_seed_optimizer("s2", [third.bias])
    with pytest.raises(ValueError, match="no param group 2"):
        opts.promote_seed("s2", group=2)
    assert opts.seed_ids == ["s2"] and len(groups[0]["params"]) == 3  # nothing moved
    assert opts.promote_seed("s2", group=1) == 1
    assert opts.state_dict()["optimizers"]["host"]["promoted"] == [
        ["s0", 1, 2],
        ["s1", 0, 1],
        ["s2", 1, 1],
    ]


def test_a_group_added_to_the_host_is_taken_up_and_saved_by_name():
    """Gradual unfreezing: the user's add_param_group is claimed for the host and recorded by
    the parameters' names, so a checkpoint can rebuild it; a promotion may then join it."""
    host, seed = models()
    other, _ = models(1)
    opts = IsolatedOptimizerManager()
    host_opt = opts.initialize_host(host.parameters(), lr=0.01)
    opts.create_seed_optimizer("s0", seed.parameters())
    host_opt.add_param_group({"params": list(other.parameters()), "lr": 0.1})
    with pytest.raises(ValueError, match="no param group 1"):
        opts.promote_seed("s0", group=1)  # not a target until taken up
    opts.take_host_groups(_namer(host=host, other=other))
    assert opts.owner_of(other.weight) == "host"
    assert opts.promote_seed("s0", near=[other.weight]) == 1
    opts.take_host_groups(_namer())  # nothing new: no name is looked up
    saved = clone_state(opts.state_dict())
    assert saved["optimizers"]["host"]["added_groups"] == [["other.weight", "other.bias"]]
    opts.load_state_dict(saved)
    saved["optimizers"]["host"]["added_groups"] = [["other.bias", "other.weight"]]
    with pytest.raises(ValueError, match="saved added groups"):
        opts.validate_state_dict(saved)


def test_an_added_group_the_host_may_not_train_is_refused_before_anything_changes():
    host, seed = models()
    other, teacher = models(1)
    names = _namer(host=host, seed=seed, other=other, teacher=teacher)
    opts = IsolatedOptimizerManager()
    host_opt = opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    opts.register_teacher_params(teacher.parameters())
    host_opt.add_param_group({"params": [other.weight]})
    for bad, owner in ((seed.bias, "owned by 's0'"), (teacher.bias, "teacher")):
        host_opt.add_param_group({"params": [bad]})
        with pytest.raises(ParameterOverlapError, match=f"add_param_group.*{owner}"):
            opts.take_host_groups(names)
        assert opts.owner_of(other.weight) is None  # the valid group is not taken up either
        del host_opt.param_groups[2]
    assert opts.state_dict()["optimizers"]["host"]["added_groups"] == []
    opts.take_host_groups(names)
    host_opt.param_groups[1]["params"].append(other.bias)  # not a group of its own
    with pytest.raises(ValueError, match="only new groups"):
        opts.take_host_groups(names)
    del host_opt.param_groups[1]
    with pytest.raises(ValueError, match="only new groups"):
        opts.take_host_groups(names)


def test_a_state_without_added_groups_still_loads():
    """States saved before added groups were recorded have no "added_groups": none."""
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    fill_grads(host, seed)
    opts.step_many(["host", "s0"])
    old = clone_state(opts.state_dict())
    for item in old["optimizers"].values():
        del item["added_groups"]
    moment = opts.optimizer("host").state[host.weight]["exp_avg"].clone()
    fill_grads(host, seed)
    opts.step_many(["host", "s0"])
    opts.load_state_dict(old)
    assert torch.equal(opts.optimizer("host").state[host.weight]["exp_avg"], moment)


@pytest.mark.parametrize("kind", ["lambda", "onecycle"])
def test_a_host_lr_scheduler_keeps_stepping_through_a_promotion(kind):
    host, seed = models()
    opts = IsolatedOptimizerManager()
    host_opt = opts.initialize_host(host.parameters(), lr=0.01)
    if kind == "lambda":  # what transformers' get_linear_schedule_with_warmup returns
        sched = torch.optim.lr_scheduler.LambdaLR(host_opt, lambda s: 1.0 - s / 100)
    else:
        sched = torch.optim.lr_scheduler.OneCycleLR(host_opt, max_lr=0.1, total_steps=100)
    opts.create_seed_optimizer("s0", seed.parameters())
    for step in range(6):
        if step == 3:
            opts.promote_seed("s0")
        fill_grads(host, seed)
        opts.step("host")
        sched.step()  # raised once the host optimizer gained a group behind its back
    assert host_opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
    assert len(host_opt.param_groups) == 1


def test_state_dict_roundtrip_and_layout_check():
    host, seed = models()
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters())
    opts.create_seed_optimizer("s0", seed.parameters())
    fill_grads(host, seed)
    opts.step("host")
    opts.step("s0")
    saved = clone_state(opts.state_dict())  # like torch, state_dict() holds live references
    exp_avg = opts.optimizer("host").state[host.weight]["exp_avg"].clone()
    fill_grads(host, seed)
    opts.step("host")
    opts.load_state_dict(saved)
    assert torch.equal(opts.optimizer("host").state[host.weight]["exp_avg"], exp_avg)
    opts.promote_seed("s0")
    with pytest.raises(ValueError, match="optimizer state is for"):
        opts.load_state_dict(saved)
    with pytest.raises(ValueError, match="format"):
        opts.load_state_dict({"format": 99})
    promoted = clone_state(opts.state_dict())
    opts.load_state_dict(promoted)
    # Same group sizes, other promotions: refused by the recorded layout.
    promoted["optimizers"]["host"]["promoted"] = [["s9", 0, 2]]
    with pytest.raises(ValueError, match="promotions"):
        opts.validate_state_dict(promoted)


def test_a_state_saved_for_parameters_of_other_shapes_is_refused():
    """A seed's kernel replaced by another with as many tensors of other shapes (a ROLLBACK
    then a GERMINATE of a wider kernel): the moments saved for the first were loaded into the
    second, whose next step raised (a fault charged to a healthy seed). Refused, nothing
    loaded; a state saved before the shapes were recorded is refused by its moments' shapes."""
    opts = IsolatedOptimizerManager()
    narrow = nn.Linear(2, 4)
    opts.create_seed_optimizer("s0", narrow.parameters())
    for p in narrow.parameters():
        p.grad = torch.ones_like(p)
    opts.step("s0")
    saved = clone_state(opts.state_dict())
    opts.remove_seed("s0")
    wide = nn.Linear(2, 8)
    opts.create_seed_optimizer("s0", wide.parameters())
    with pytest.raises(ValueError, match=r"shapes \[\[4, 2\], \[4\]\] != \[\[8, 2\], \[8\]\]"):
        opts.load_state_dict(saved)
    assert not opts.optimizer("s0").state  # nothing loaded
    older = clone_state(saved)
    del older["optimizers"]["s0"]["shapes"]
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter 0 is \(4, 2\), not"):
        opts.validate_state_dict(older)  # no record to compare with: the moments say it


def _format1(opts: IsolatedOptimizerManager, seed_ids: list[str]) -> dict:
    """What format 1 saved for ``opts`` (whose host holds ``seed_ids`` promoted, in order): each
    promoted seed in a param group of its own, tagged with its id."""
    state = clone_state(opts.state_dict())
    host = state["optimizers"]["host"]
    (group,) = host["state"]["param_groups"]
    sizes = [c for _, _, c in host.pop("promoted")]
    base = len(group["params"]) - sum(sizes)
    groups = [dict(group, params=group["params"][:base])]
    for size in sizes:
        start = sum(len(g["params"]) for g in groups)
        groups.append(dict(group, params=group["params"][start : start + size], lr=0.5))
    host["state"]["param_groups"] = groups
    host["groups"] = ["host", *seed_ids]
    for oid, item in state["optimizers"].items():
        if oid != "host":
            del item["promoted"]
            item["groups"] = [oid]
    return {"format": 1, "optimizers": state["optimizers"]}


def test_a_format_1_state_still_loads():
    """Older checkpoints kept promoted seeds in groups of their own: they load into the merged
    layout, the saved moments on the right tensors, the seeds at the host group's lr."""
    host, seed = models()
    other, _ = models(1)
    opts = IsolatedOptimizerManager()
    opts.initialize_host(host.parameters(), lr=0.01)
    opts.create_seed_optimizer("s0", seed.parameters())
    opts.create_seed_optimizer("s1", other.parameters())
    opts.promote_seed("s0")
    fill_grads(host, seed, other)
    opts.step_many(["host", "s1"])
    old = _format1(opts, ["s0"])
    assert len(old["optimizers"]["host"]["state"]["param_groups"]) == 2
    moments = {p: opts.optimizer("host").state[p]["exp_avg"].clone() for p in seed.parameters()}
    fill_grads(host, seed, other)
    opts.step_many(["host", "s1"])
    opts.load_state_dict(old)
    host_opt = opts.optimizer("host")
    assert len(host_opt.param_groups) == 1 and host_opt.param_groups[0]["lr"] == 0.01
    assert all(torch.equal(host_opt.state[p]["exp_avg"], m) for p, m in moments.items())
    broken = clone_state(old)
    broken["optimizers"]["host"]["groups"] = ["host"]
    with pytest.raises(ValueError, match="group tags"):
        opts.load_state_dict(broken)


def test_a_loaded_state_brings_its_optimizers_defaults_and_an_older_one_keeps_them() -> None:
    """A rebuilt optimizer took its constructor's ``defaults`` (lr 1e-3 for a host INITIALIZE_HOST
    had made at 0.25), which a group added later takes: a state now carries them. A state saved
    before it did leaves a live optimizer's own, and a rebuilt one's as built."""
    host, _ = models()
    saved = IsolatedOptimizerManager()
    saved.initialize_host(host.parameters(), lr=0.25, weight_decay=0.1)
    state = clone_state(saved.state_dict())
    rebuilt = IsolatedOptimizerManager()
    rebuilt.initialize_host(host.parameters())
    rebuilt.load_state_dict(state)
    defaults = rebuilt.optimizer("host").defaults
    assert (defaults["lr"], defaults["weight_decay"]) == (0.25, 0.1)
    tensor_lr = IsolatedOptimizerManager()  # a tensor lr: copied, never the saved state's own
    tensor_lr.initialize_host(host.parameters(), lr=torch.tensor(0.5))
    kept = clone_state(tensor_lr.state_dict())
    tensor_lr.load_state_dict(kept)
    tensor_lr.optimizer("host").defaults["lr"].mul_(0.1)
    assert float(kept["optimizers"]["host"]["defaults"]["lr"]) == 0.5
    live = IsolatedOptimizerManager()
    live.initialize_host(host.parameters(), lr=0.5)
    older = IsolatedOptimizerManager()
    older.initialize_host(host.parameters())
    del state["optimizers"]["host"]["defaults"]
    older.load_state_dict(state)
    live.adopt(older)
    assert live.optimizer("host").defaults["lr"] == 0.5


def test_adopt_keeps_the_live_optimizer_objects_and_a_schedulers_keys():
    """A rollback's commit: the built layout and state move into the live objects."""
    host, seed = models()
    live = IsolatedOptimizerManager()
    host_opt = live.initialize_host(host.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(host_opt, max_lr=0.1, total_steps=50)
    live.create_seed_optimizer("s0", seed.parameters())
    live.promote_seed("s0")
    group = host_opt.param_groups[0]
    params = group["params"]

    built = IsolatedOptimizerManager()  # the checkpoint's layout: s0 still its own optimizer
    built.initialize_host(host.parameters(), lr=0.02)
    built.create_seed_optimizer("s0", seed.parameters(), lr=0.03)
    fill_grads(host, seed)
    built.step_many(["host", "s0"])
    expected = clone_state(built.state_dict())
    built.load_state_dict(expected)  # as a rollback loads its checkpoint: defaults too
    live.adopt(built)
    assert host_opt.defaults["lr"] == 0.02  # the checkpoint's, not the live optimizer's
    assert live.optimizer("host") is host_opt and host_opt.param_groups[0] is group
    assert group["params"] is params  # the lists, too, stay the live ones
    assert live.optimizer("s0") is built.optimizer("s0")
    assert _ids(group["params"]) == _ids(host.parameters()) and group["lr"] == 0.02
    assert "initial_lr" in group and "max_lr" in group  # the scheduler's keys stay
    assert live.promoted() == {} and live.owner_of(seed.weight) == "s0"
    got = clone_state(live.state_dict())
    (saved_group,) = got["optimizers"]["host"]["state"]["param_groups"]
    (built_group,) = expected["optimizers"]["host"]["state"]["param_groups"]
    kept = set(saved_group) - set(built_group)
    assert {"initial_lr", "max_lr", "min_lr"} <= kept
    for key in kept:
        del saved_group[key]
    assert repr(got) == repr(expected)  # otherwise exactly what was built and loaded
    sched.step()
    assert group["lr"] == sched.get_last_lr()[0]


class _Lion(torch.optim.Optimizer):
    """A hand-written optimizer, built without torch's ``differentiable`` default."""

    def __init__(self, params, lr: float = 1e-4) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


@pytest.mark.parametrize("cls", [torch.optim.Adafactor, _Lion], ids=["Adafactor", "custom"])
def test_a_state_loads_twice_and_a_group_without_a_hyperparameter_is_refused(cls) -> None:
    """A saved group without a key the step reads (its ``lr``) is refused before it loads.
    torch's load adds ``differentiable`` to the defaults of an optimizer built without it, and
    no group gets it: that is no missing key, so the same state loads a second time."""
    opts = IsolatedOptimizerManager(default_optimizer_cls=cls)
    w = nn.Parameter(torch.randn(4, 4))
    opts.create_seed_optimizer("s0", [w], lr=1e-3)
    w.grad = torch.randn(4, 4)
    opts.step("s0")
    saved = clone_state(opts.state_dict())
    for _ in range(2):
        opts.load_state_dict(saved)
    saved["optimizers"]["s0"]["state"]["param_groups"][0].pop("lr")
    with pytest.raises(ValueError, match="param group 0 has no 'lr'"):
        opts.load_state_dict(saved)
    assert opts.optimizer("s0").param_groups[0]["lr"] == 1e-3


def test_clipping_takes_a_sparse_gradient_by_its_rows() -> None:
    """A sparse embedding's gradient (uncoalesced: a row per lookup) is measured by its rows
    summed and scaled with the rest: clipping to a finite norm raised in the middle of the
    manager's step for a model with a sparse embedding."""
    torch.manual_seed(5)
    emb, fc = nn.Embedding(6, 3, sparse=True), nn.Linear(3, 2)
    fc(emb(torch.tensor([1, 2, 2, 4]))).square().sum().backward()
    assert emb.weight.grad.is_sparse and not emb.weight.grad.is_coalesced()
    original = [emb.weight.grad.to_dense().double(), fc.weight.grad.double(), fc.bias.grad.double()]
    true_norm = torch.cat([g.reshape(-1) for g in original]).norm()
    total = clip_gradients([emb.weight, fc.weight, fc.bias], 0.5)
    torch.testing.assert_close(total.double(), true_norm, rtol=1e-6, atol=0)
    coef = 0.5 / (float(true_norm) + 1e-6)
    got = [emb.weight.grad.to_dense(), fc.weight.grad, fc.bias.grad]
    for g, want in zip(got, original, strict=True):
        torch.testing.assert_close(g.double(), want * coef, rtol=1e-6, atol=1e-7)
    assert emb.weight.grad.is_sparse
