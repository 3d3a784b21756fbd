"""GradientIsolatedSeed: each stage's forward value and gradients, KD, fallback, persistence."""

from __future__ import annotations

import copy
import gc
import math
import weakref
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kasmina.errors import IllegalTransitionError
from kasmina.kd import loss as kd_loss_module
from kasmina.kd.config import KDConfig
from kasmina.ops import kd_kl_loss
from kasmina.seeds.columns import blueprint_hash
from kasmina.seeds.extra_state import decode_extra_state, encode_extra_state
from kasmina.seeds.gates import SeedEvaluation
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage, StateColumn

S = SeedStage
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]
C = 3


class Net(nn.Module):
    """upstream -> seed slot -> downstream: the slot sees the upstream layer's output."""

    def __init__(self, seed: GradientIsolatedSeed | None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.Linear(4, C)
        self.down = nn.Linear(C, 2)
        self.seed = seed

    def forward(self, x: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        h = self.up(x)
        if self.seed is not None:
            h = self.seed(h, teacher)
        return self.down(h)


def make_seed(stage: SeedStage, kd: KDConfig | None = None) -> GradientIsolatedSeed:
    seed = GradientIsolatedSeed(C, "s0", kd)
    torch.manual_seed(7)
    seed.attach_kernel(nn.Sequential(nn.Linear(C, C), nn.Tanh()))
    for step in PATH[: PATH.index(stage) + 1] if stage in PATH else []:
        seed.transition_to(step)
    return seed


def host_grads(net: Net) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in net.named_parameters() if not n.startswith("seed.")}


def run(net: Net, x: torch.Tensor) -> torch.Tensor:
    out = net(x)
    out.pow(2).sum().backward()
    return out


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(5, 4)


@pytest.mark.parametrize(
    "stage", [S.DORMANT, S.COOLDOWN, S.HARVESTING, S.RECYCLING, S.QUARANTINE, S.TERMINATED]
)
def test_pass_through_stages_return_the_host_activations(stage: SeedStage) -> None:
    seed = GradientIsolatedSeed(C, "s")
    seed.attach_kernel(nn.Linear(C, C))
    seed.state_table.restore_row(0, [int(stage)] + [0] * 9)
    h = torch.randn(2, C, requires_grad=True)
    assert seed(h) is h


def test_no_kernel_passes_through_in_any_stage() -> None:
    seed = make_seed(S.ISOLATED_INIT)
    seed.detach_kernel()
    h = torch.randn(2, C)
    assert seed(h) is h


def test_isolated_init_is_bit_identical_for_the_host_and_trains_the_seed(x) -> None:
    bare = Net(None)
    bare_out = run(bare, x)
    net = Net(make_seed(S.ISOLATED_INIT))
    out = run(net, x)
    assert torch.equal(out, bare_out)
    for name, grad in host_grads(net).items():
        assert torch.equal(grad, host_grads(bare)[name]), name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.seed.seed_parameters())


@pytest.mark.parametrize("stage", [S.GRAFTING, S.STABILIZATION])
def test_grafting_and_stabilization_give_the_upstream_host_no_gradient(x, stage) -> None:
    seed = make_seed(stage)
    seed.update_alpha_blending(6, 10, 2.0)  # a no-op outside GRAFTING
    net = Net(seed)
    h = net.up(x).detach()
    with torch.no_grad():
        s = seed.kernel(h)
    alpha = 1.0 / (1.0 + math.exp(-0.5)) if stage is S.GRAFTING else 1.0
    out = run(net, x)
    torch.testing.assert_close(out, net.down(alpha * s + (1 - alpha) * h))
    assert net.up.weight.grad is None and net.up.bias.grad is None
    assert net.down.weight.grad is not None
    assert all(p.grad.abs().sum() > 0 for p in seed.seed_parameters())


def test_active_gives_the_full_end_to_end_gradient(x) -> None:
    seed = make_seed(S.ACTIVE)
    net = Net(seed)
    out = run(net, x)
    ref = copy.deepcopy(net)
    ref.zero_grad(set_to_none=True)
    ref_out = ref.down(ref.seed.kernel(ref.up(x)))
    ref_out.pow(2).sum().backward()
    assert torch.equal(out, ref_out)
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7), name


def test_kd_only_backward_trains_the_seed_and_leaves_the_host_untouched(x) -> None:
    kd = KDConfig(temperature=2.0)
    seed = make_seed(S.GRAFTING, kd)
    seed.update_alpha_blending(3, 10)
    net = Net(seed)
    teacher = torch.randn(5, C)
    net(x, teacher)
    loss = seed.get_and_clear_kd_losses()
    assert loss is not None and loss.requires_grad and seed.get_and_clear_kd_losses() is None
    with torch.no_grad():
        expected = kd_kl_loss(seed.kernel(net.up(x)), teacher, 2.0)
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert all(g is None or not g.any() for g in host_grads(net).values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seed.seed_parameters())


def test_kd_losses_accumulate_and_need_matching_teacher_shape(x) -> None:
    seed = make_seed(S.ISOLATED_INIT, KDConfig())
    h = torch.randn(5, C)
    teacher = torch.randn(5, C)
    seed(h, teacher)
    seed(h, teacher)
    total = seed.get_and_clear_kd_losses()
    single = kd_kl_loss(seed.kernel(h), teacher, 2.0)
    torch.testing.assert_close(total, 2 * single)
    with pytest.raises(ValueError):
        seed(h, torch.randn(5, C + 1))
    active = make_seed(S.ACTIVE, KDConfig())
    active(h, teacher)  # a fossilized seed trains with the host: no seed-only KD loss
    assert active.get_and_clear_kd_losses() is None


@pytest.mark.parametrize(
    "failure", [torch.OutOfMemoryError("out of memory"), RuntimeError("illegal memory access")]
)
def test_a_kd_loss_that_raises_is_the_seeds_fault(x, monkeypatch, caplog, failure) -> None:
    """``seed(x, teacher)`` raised the KD op's failure (an allocation) out of the host's
    forward. It returns what it would without the teacher, keeps no loss, and the seed is
    charged; logits that cannot teach are still the caller's ``ValueError``."""
    seed = make_seed(S.GRAFTING, KDConfig())
    seed.update_alpha_blending(3, 10)
    net, teacher = Net(seed), torch.randn(5, C)
    want = net(x)

    def kd_kl_loss(*args, **kwargs):
        raise failure

    monkeypatch.setattr(kd_loss_module, "kd_kl_loss", kd_kl_loss)
    out = net(x, teacher)
    assert torch.equal(out, want) and seed.get_and_clear_kd_losses() is None
    out.pow(2).sum().backward()
    assert net.down.weight.grad is not None  # the host's backward runs
    assert seed.faults == 1 and type(failure).__name__ in seed.fault_log[-1]
    assert (
        "(kd): its KD loss raised" in caplog.text
        and "KD loss of the call is skipped" in caplog.text
    )
    with pytest.raises(ValueError):
        net(x, torch.randn(5, C + 1))
    assert seed.faults == 1


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION])
def test_non_finite_output_falls_back_to_the_host_then_quarantines_at_the_limit(x, stage) -> None:
    seed = make_seed(stage)
    seed.update_alpha_blending(5, 10)
    with torch.no_grad():
        seed.kernel[0].weight[0, 0] = float("nan")
    net = Net(seed)
    bare = Net(None)
    for poll in range(1, seed.fault_limit + 1):
        net.zero_grad(set_to_none=True)
        out = run(net, x)
        assert torch.equal(out, bare(x))
        if stage is not S.ISOLATED_INIT:
            assert net.up.weight.grad is None
        assert seed.stage is stage  # no sync in the forward: the flag waits for the poll
        run(net, x)  # a second fallback before the poll: still one fault
        assert seed.poll_nonfinite() is True
        assert seed.nonfinite_events == poll and seed.faults == poll
    assert seed.stage is S.QUARANTINE and list(seed.fault_log) == ["non-finite output"] * 3
    assert seed.poll_nonfinite() is False


def test_active_non_finite_falls_back_but_cannot_be_quarantined(x) -> None:
    seed = make_seed(S.ACTIVE)
    with torch.no_grad():
        seed.kernel[0].bias.fill_(float("nan"))
    net = Net(seed)
    out = run(net, x)
    bare = Net(None)
    assert torch.equal(out, run(bare, x))
    assert torch.equal(net.up.weight.grad, bare.up.weight.grad)  # the NaN gradient was cut
    assert seed.poll_nonfinite() is True and seed.stage is S.ACTIVE


def test_wrong_output_shape_passes_the_host_through_until_the_fault_limit() -> None:
    seed = GradientIsolatedSeed(C, "s")
    seed.attach_kernel(nn.Linear(C, C + 1))
    seed.transition_to(S.ISOLATED_INIT)
    h = torch.randn(2, C)
    for _ in range(seed.fault_limit - 1):
        assert seed(h) is h and seed.stage is S.ISOLATED_INIT
    assert seed(h) is h and seed.stage is S.QUARANTINE and seed.faults == seed.fault_limit
    with pytest.raises(ValueError):  # a host chunk of the wrong width is the caller's error
        make_seed(S.ISOLATED_INIT)(torch.randn(2, C + 2))


def test_compatibility_check_probes_for_g3() -> None:
    seed = make_seed(S.COMPATIBILITY_CHECK)
    assert not seed.evaluate_gate(latency_budget_ms=1e3).passed  # nothing probed yet
    h = torch.randn(2, C, requires_grad=True)
    assert seed(h) is h
    probe = seed.probe_result
    assert probe is not None and probe.host_shape == (2, C) and probe.output.shape == (2, C)
    assert seed.evaluate_gate(latency_budget_ms=1e3).passed
    assert "advisory" in seed.evaluate_gate(latency_budget_ms=1e-9).reason  # never decides
    # Counted cost: Linear(C, C) is 2*C FLOPs per output element.
    assert seed.evaluate_gate(host_flops_per_element=2.0 * C, max_cost_ratio=1.0).passed
    assert not seed.evaluate_gate(host_flops_per_element=C, max_cost_ratio=1.5).passed
    with pytest.raises(ValueError):  # swapping the kernel while it runs is refused
        seed.attach_kernel(nn.Linear(C, C))


class _OutputWatcher(nn.Module):
    """``Linear(C, C)`` that keeps a weak reference to each output it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(C, C)
        self.outputs: list[weakref.ref[torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.outputs.append(weakref.ref(out))
        return out


def test_compatibility_probe_keeps_what_g3_reads_not_the_output() -> None:
    """A COMPATIBILITY_CHECK seed waits an epoch for G3; its probe must not hold an
    activation-sized output all that time, only its shape, dtype and finiteness."""
    seed = make_seed(S.COMPATIBILITY_CHECK)
    watcher = _OutputWatcher()
    seed.detach_kernel()
    seed.attach_kernel(watcher)
    seed(torch.randn(3, C))
    assert seed.probe_result is not None and watcher.outputs
    gc.collect()
    assert all(ref() is None for ref in watcher.outputs)
    assert seed.evaluate_gate(latency_budget_ms=1e3).passed
    seed(torch.full((3, C), float("nan")))  # a non-finite probe is still refused at G3
    assert "not finite" in seed.evaluate_gate(latency_budget_ms=1e3).reason


def test_alpha_schedule_is_in_place_and_mirrored_in_the_table() -> None:
    seed = make_seed(S.COMPATIBILITY_CHECK)
    alpha_buffer = seed.alpha
    assert seed.update_alpha_blending(10, 10) == 0.0  # not GRAFTING: unchanged
    seed.transition_to(S.GRAFTING)
    values = [seed.update_alpha_blending(step, 20, 2.0) for step in (0, 10, 20)]
    assert values[0] == pytest.approx(1 / (1 + math.exp(5)))
    assert values[1] == 0.5 and values[2] == pytest.approx(1 / (1 + math.exp(-5)))
    assert seed.alpha is alpha_buffer and seed.alpha.item() == pytest.approx(values[2])
    row = seed.state_table.read_row(0)
    assert row["ALPHA_BLEND"] == round(values[2] * 1000)
    with pytest.raises(ValueError):
        seed.update_alpha_blending(1, 0)


@pytest.mark.parametrize(
    ("path", "end"), [(PATH[:3], S.QUARANTINE), (PATH[:4], S.QUARANTINE), (PATH, S.TERMINATED)]
)
def test_a_seed_that_stops_running_reports_alpha_zero_and_no_evaluation(path, end) -> None:
    """A quarantined (or terminated ACTIVE) seed passes the host through, but kept reporting
    the alpha it blended at (the table's ALPHA_BLEND, telemetry) and its last evaluation."""
    seed = GradientIsolatedSeed(C, "s0")
    seed.attach_kernel(nn.Sequential(nn.Linear(C, C), nn.Tanh()))
    for stage in path:
        seed.transition_to(stage)
    seed.update_alpha_blending(10, 20)
    seed.gate_score = 0.7
    assert seed.alpha_value > 0
    seed.transition_to(end)
    assert seed.alpha_value == 0.0 and seed.state_table.read_row(0)["ALPHA_BLEND"] == 0
    assert seed.gate_score == 0.0 and seed.evaluation is None
    h = torch.randn(5, C)
    assert torch.equal(seed(h), h)  # what it reports: the host's own output


def test_a_score_measured_in_isolation_is_dropped_on_entering_compatibility_check() -> None:
    """COMPATIBILITY_CHECK's forward is the host's too, but the gate score and evaluation
    measured in ISOLATED_INIT survived the ADVANCE (table, telemetry, ``system_state()``)."""
    seed = GradientIsolatedSeed(C, "s0")
    seed.attach_kernel(nn.Sequential(nn.Linear(C, C), nn.Tanh()))
    seed.transition_to(S.ISOLATED_INIT)
    seed.gate_score = 0.5
    assert seed.state_table.read_row(0)["GATE_SCORE"] == 500
    seed.transition_to(S.COMPATIBILITY_CHECK)
    assert seed.gate_score == 0.0 and seed.evaluation is None
    assert seed.state_table.read_row(0)["GATE_SCORE"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_alpha_stays_float32_and_exact_when_the_model_changes_dtype(dtype: torch.dtype) -> None:
    seed = make_seed(S.GRAFTING)
    value = seed.update_alpha_blending(12, 20, 0.5)  # 0.98201...: not representable in 16 bits
    net = Net(seed).to(dtype)
    alpha = seed.alpha
    assert alpha.dtype == torch.float32 and alpha.item() == torch.tensor(value).item()
    x = torch.randn(5, 4, dtype=dtype)
    h = net.up(x)
    expected = net.down(alpha.to(dtype) * seed.kernel(h) + (1 - alpha.to(dtype)) * h)
    assert net(x).dtype == dtype
    torch.testing.assert_close(net(x), expected)
    assert seed.update_alpha_blending(20, 20, 0.5) > value and seed.alpha is alpha  # in place


def test_advance_runs_the_gates_along_the_main_path() -> None:
    seed = GradientIsolatedSeed(C, "s")
    assert not seed.advance().passed and seed.stage is S.DORMANT  # G1: no kernel
    seed.attach_kernel(nn.Linear(C, C), artifact_id="bp-1")
    assert seed.advance().gate == 1 and seed.stage is S.ISOLATED_INIT
    assert not seed.advance(min_isolated_epochs=1).passed  # G2: no epoch yet
    seed.state_table.tick()
    assert "trained in 0 of the 1" in seed.advance(min_isolated_epochs=1).reason  # not trained
    # A stand-alone seed's owner steps it, and counts the epochs it trained in (the manager
    # does this for its seeds): one real step in ISOLATED_INIT.
    optimizer = torch.optim.SGD(seed.seed_parameters(), lr=0.1)
    seed(torch.randn(4, C)).square().sum().backward()
    optimizer.step()
    seed.trained_epochs += 1
    seed.isolation_violations = 1
    assert not seed.advance(min_isolated_epochs=1).passed
    seed.isolation_violations = 0
    assert seed.advance(min_isolated_epochs=1).passed
    assert seed.advance(latency_budget_ms=1e3, sample=torch.randn(2, C)).passed  # G3
    assert seed.stage is S.GRAFTING and not seed.advance().passed  # G4: alpha 0
    seed.update_alpha_blending(1000, 1000, 1.0)
    assert seed.advance().passed and seed.stage is S.STABILIZATION
    seed.performance_gate = 0.9
    seed.gate_score = 0.95  # a score nobody measured is no evidence
    assert "never evaluated" in seed.advance().reason and seed.stage is S.STABILIZATION
    seed.record_evaluation(SeedEvaluation("s", S.STABILIZATION, 1.0, 0.9, 1.0))  # score 0.55
    assert not seed.advance().passed
    seed.record_evaluation(SeedEvaluation("s", S.STABILIZATION, 1.0, 0.1, 1.0))  # score 0.95
    assert seed.advance().passed and seed.stage is S.ACTIVE
    row = seed.state_table.read_row(0)
    assert row["LAST_GATE"] == 5 and row["GATE_SCORE"] == 950 and row["PERFORMANCE_GATE"] == 900
    with pytest.raises(IllegalTransitionError):
        seed.advance()  # ACTIVE has no next stage
    with pytest.raises(IllegalTransitionError):
        seed.transition_to(S.QUARANTINE)
    assert not seed.quarantine("test") and seed.stage is S.ACTIVE


def test_harvest_releases_the_kernel_and_recycling_resets() -> None:
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(8, 10)
    seed.isolation_violations = 2
    kernel = seed.kernel
    seed.transition_to(S.HARVESTING)
    assert seed.kernel is None and seed.field_report is not None
    assert seed.field_report["from_stage"] == "GRAFTING"
    assert seed.field_report["isolation_violations"] == 2
    seed.transition_to(S.COOLDOWN)
    seed.transition_to(S.RECYCLING)
    assert seed.alpha_value == 0.0 and seed.isolation_violations == 0
    assert seed.field_report is None  # the next seed of the slot reported the culled one's
    seed.transition_to(S.DORMANT)
    seed.attach_kernel(kernel)
    assert seed.kernel is kernel
    assert seed.detach_kernel() is kernel and seed.seed_parameters() == []


def test_state_dict_round_trips_weights_stage_alpha_and_counters() -> None:
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(7, 10, 1.5)
    seed.gate_score = 0.42
    seed.isolation_violations = 1
    seed.state_table.tick()
    saved = seed.state_dict()
    clone = GradientIsolatedSeed(C, "s0")
    torch.manual_seed(99)
    clone.attach_kernel(nn.Sequential(nn.Linear(C, C), nn.Tanh()))
    clone.load_state_dict(saved)
    assert clone.stage is S.GRAFTING and clone.epochs_in_stage == 1
    assert clone.alpha_value == seed.alpha_value and torch.equal(clone.alpha, seed.alpha)
    assert clone.gate_score == 0.42 and clone.isolation_violations == 1
    assert torch.equal(clone.state_table.state_tensor, seed.state_table.state_tensor)
    for p, q in zip(clone.seed_parameters(), seed.seed_parameters(), strict=True):
        assert torch.equal(p, q)
    h = torch.randn(2, C)
    assert torch.equal(clone(h), seed(h))


def test_a_malformed_extra_state_changes_nothing() -> None:
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(7, 10, 1.5)
    saved = seed.state_dict()
    target = make_seed(S.ISOLATED_INIT)
    table_before = target.state_table.state_tensor.clone()
    extra = dict(decode_extra_state(saved["_extra_state"]))
    del extra["nonfinite_events"]
    with pytest.raises(ValueError, match="no .nonfinite_events."):
        target.set_extra_state(extra)
    assert target.stage is S.ISOLATED_INIT and target.alpha_value == 0.0
    assert torch.equal(target.state_table.state_tensor, table_before)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("alpha", float("nan")),
        ("alpha", 1.5),
        ("alpha", "0.5"),
        ("performance_gate", float("-inf")),
        ("performance_gate", 10**400),  # past a float's range: float() raised OverflowError
        ("gate_score", float("inf")),
        ("faults", "3"),
        ("faults", -1),
        ("faults", 2.0),
        ("isolation_violations", True),
        ("nonfinite_events", 1e300),
    ],
)
def test_an_out_of_range_extra_state_field_is_refused(field: str, value: object) -> None:
    """A saved state whose numbers are out of range (an edited file: an alpha of NaN made
    every later step raise in the alpha schedule) is refused, naming the field, and changes
    nothing; a NaN gate score (only reported) is taken."""
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(7, 10, 1.5)
    extra = dict(decode_extra_state(seed.state_dict()["_extra_state"]))
    target = make_seed(S.ISOLATED_INIT)
    table_before = target.state_table.state_tensor.clone()
    with pytest.raises(ValueError, match=field):
        target.set_extra_state(encode_extra_state({**extra, field: value}))
    assert target.stage is S.ISOLATED_INIT and target.alpha_value == 0.0
    assert torch.equal(target.state_table.state_tensor, table_before)
    target.set_extra_state(encode_extra_state({**extra, "gate_score": float("nan")}))
    assert target.stage is S.GRAFTING and math.isnan(target.gate_score)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("graft_step", -2),
        ("graft_step", 2**63),
        ("gate_score", float("inf")),
        ("gate_score", float("-inf")),
        ("gate_score", 1e7),  # past the table's int32 * 1000
        ("performance_gate", 3e6),
        ("performance_gate", float("nan")),
    ],
)
def test_a_setter_refuses_what_a_load_would_refuse(field: str, value: float) -> None:
    """``update_alpha_blending(-2, 10)`` stored ``graft_step = -2`` and ``gate_score = inf``
    was kept (only the table write was skipped): the model saved, and loading it refused
    "saved 'graft_step' / 'gate_score'"; a score or threshold past the table's range raised a
    bare RuntimeError. Each setter now checks by the load's own rule: a refusal is a
    ValueError naming the field and changes nothing, and what a setter takes loads back."""
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(3, 10)
    seed.gate_score, seed.performance_gate = 0.25, 0.5
    before = (seed.graft_step, seed.alpha_value, seed.gate_score, seed.performance_gate)
    table = seed.state_table.state_tensor.clone()
    with pytest.raises(ValueError, match=f"seed s0: {field} must"):
        if field == "graft_step":
            seed.update_alpha_blending(value, 10)
        else:
            setattr(seed, field, value)
    assert (seed.graft_step, seed.alpha_value, seed.gate_score, seed.performance_gate) == before
    assert torch.equal(seed.state_table.state_tensor, table)
    seed.update_alpha_blending(2**63 - 1, 10)  # the extremes a setter takes
    seed.gate_score, seed.performance_gate = float("nan"), -(2**31) / 1000
    make_seed(S.GRAFTING).load_state_dict(seed.state_dict())


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((7, float("nan")), "total_steps"),  # graft_step moved, then int(NaN) raised
        ((7, float("inf")), "total_steps"),  # alpha pinned at 0
        ((7, 10**400), "total_steps"),  # OverflowError in the schedule
        ((7, 10, float("inf")), "temperature"),  # alpha pinned at 0.5
        ((7, 10, float("nan")), "temperature"),
        ((float("inf"), 10), "graft_step"),  # OverflowError
        ((2.5, 10), "graft_step"),  # stored 2, alpha from 2.5
    ],
)
def test_alpha_schedule_arguments_are_all_checked_before_anything_changes(
    args: tuple[float, ...], name: str
) -> None:
    """``update_alpha_blending(7, nan)`` passed the ``total_steps <= 0`` check, moved
    ``graft_step`` and then raised "cannot convert float NaN to integer"; an infinite
    ``total_steps`` or temperature was taken (alpha pinned), an infinite step raised an
    OverflowError. Every argument is checked first now: a ValueError naming it, nothing
    changed."""
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(3, 10)
    before = (seed.graft_step, seed.alpha_value, seed.alpha.item())
    table = seed.state_table.state_tensor.clone()
    with pytest.raises(ValueError, match=f"seed s0: {name} must"):
        seed.update_alpha_blending(*args)
    assert (seed.graft_step, seed.alpha_value, seed.alpha.item()) == before
    assert torch.equal(seed.state_table.state_tensor, table)


def test_a_seed_pickled_before_the_stage_code_keeps_one_once_loaded() -> None:
    """A seed pickled before it kept its stage as an int came back with neither the int nor
    its table listener: compiled, its forward read the unguarded stage again (the graph of
    the first stage ran in every later one). Unpickled, it listens and keeps the int."""
    import pickle

    old = make_seed(S.ISOLATED_INIT)
    del old.__dict__["_stage_code"]  # as a pickle of that version holds it
    seed = pickle.loads(pickle.dumps(old))
    assert seed._stage_code == int(S.ISOLATED_INIT)
    seed.transition_to(S.COMPATIBILITY_CHECK)
    assert seed._stage_code == int(S.COMPATIBILITY_CHECK)


def test_a_compiled_stand_alone_seed_follows_every_stage_change(x) -> None:
    """Compiled, a stand-alone seed's forward read its stage as a SeedStage from the table,
    which TorchDynamo does not guard: the graph compiled in the first stage ran in every later
    one, so a compiled seed trained in isolation forever and never grafted (ACTIVE gave the
    host's output). The seed keeps its stage as an int for the compiled forward, guarded by
    value: each stage change recompiles, and each stage matches eager, value and gradients."""
    torch._dynamo.reset()
    seed = make_seed(S.DORMANT)
    net = Net(seed)
    compiled = torch.compile(net, backend="aot_eager")
    for stage in [S.DORMANT, *PATH]:
        if stage is not S.DORMANT:
            seed.transition_to(stage)
        if stage is S.GRAFTING:
            seed.update_alpha_blending(3, 10)
        _same_eager_and_compiled(net, compiled, lambda model: run(model, x), stage.name)


def _same_eager_and_compiled(
    net: Net, compiled: nn.Module, step: Callable[[nn.Module], torch.Tensor], what: str
) -> None:
    """``step`` (a forward and backward, returning the output) of ``net`` and of ``compiled``
    give the same output and the same gradient for each parameter of ``net``."""
    results = []
    for model in (net, compiled):
        net.zero_grad(set_to_none=True)
        out = step(model)
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    (eager, eager_grads), (got, got_grads) = results
    torch.testing.assert_close(got, eager, msg=what)
    for name, grad in eager_grads.items():
        assert (grad is None) == (got_grads[name] is None), (what, name)
        if grad is not None:
            torch.testing.assert_close(got_grads[name], grad, msg=f"{what} {name}")


class Breaking(nn.Module):
    """A kernel TorchDynamo cannot trace whole (a print, an ``.item()``): a graph break."""

    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return torch.tanh(self.lin(x))


def test_a_compiled_seed_whose_kernel_breaks_the_graph_follows_every_stage_change(x) -> None:
    """A graph break in the kernel resumes the seed's compiled forward in a frame of its own,
    which received the stage as a SeedStage and, read through a set (the KD check), did not
    guard it: after ISOLATED_INIT a KD seed kept its ISOLATED_INIT graph (the host's output,
    the host's gradient through the seed). The resume reads the stage from its int again."""
    torch._dynamo.reset()
    seed = GradientIsolatedSeed(C, "s0", KDConfig(temperature=2.0))
    seed.attach_kernel(Breaking(C))
    net = Net(seed)
    compiled = torch.compile(net, backend="aot_eager")
    teacher = torch.randn(5, C, generator=torch.Generator().manual_seed(4))
    kd_seen: list[bool] = []  # per run: whether it made a KD loss

    def step(model: nn.Module) -> torch.Tensor:
        out = model(x, teacher)
        kd = seed.get_and_clear_kd_losses()
        kd_seen.append(kd is not None)
        (out.pow(2).sum() + (0.0 if kd is None else kd)).backward()
        return out

    for stage in PATH:
        seed.transition_to(stage)
        if stage is S.GRAFTING:
            seed.update_alpha_blending(3, 10)
        _same_eager_and_compiled(net, compiled, step, stage.name)
        assert kd_seen[-2] == kd_seen[-1], stage.name


def test_a_duplicated_or_deeply_nested_extra_state_is_a_value_error() -> None:
    text = '{"version": 1, "version": 1}'
    for raw in (text, "[" * 5000 + "]" * 5000):
        value = torch.frombuffer(bytearray(raw.encode()), dtype=torch.uint8).clone()
        with pytest.raises(ValueError, match="not valid JSON"):
            decode_extra_state(value)


def test_shared_table_slot_and_constructor_validation() -> None:
    table = GPUStateTensor(4, "cpu")
    seed = GradientIsolatedSeed(C, "shared", state=table, index=2)
    seed.attach_kernel(nn.Linear(C, C), artifact_id="bp")
    seed.transition_to(S.ISOLATED_INIT)
    assert table.stage(2) is S.ISOLATED_INIT and table.stage(0) is S.DORMANT
    assert table.read_row(2)["LAST_GATE"] == 1
    assert table.state_tensor[2, StateColumn.BLUEPRINT_ID] == blueprint_hash("bp")
    with pytest.raises(IndexError):
        GradientIsolatedSeed(C, "bad", state=table, index=4)
    for bad in ((0, "s"), (C, "")):
        with pytest.raises(ValueError):
            GradientIsolatedSeed(*bad)
    with pytest.raises(ValueError):
        seed.attach_kernel("not a module")  # type: ignore[arg-type]


def test_forward_on_the_triton_path_matches_the_reference(triton_backend, x) -> None:
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(4, 10)
    h = torch.randn(5, C, requires_grad=True)
    out = seed(h)
    with torch.no_grad():
        expected = seed.alpha * seed.kernel(h) + (1 - seed.alpha) * h
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert h.grad is None


def test_loading_a_state_drops_the_evaluation_of_the_weights_it_replaces() -> None:
    """Evaluations are not checkpointed: after ``load_state_dict`` (new kernel weights, in
    place), G5 must not fossilize on what the old weights measured."""
    seed = make_seed(S.STABILIZATION)
    other = make_seed(S.STABILIZATION)
    with torch.no_grad():
        for p in other.seed_parameters():
            p.mul_(20.0)
    seed.record_evaluation(SeedEvaluation("s0", S.STABILIZATION, 1.0, 0.5, 1.0))
    assert seed.evaluate_gate(S.ACTIVE, performance_gate=0.5).passed
    seed.load_state_dict(other.state_dict())
    assert seed.evaluation is None
    result = seed.evaluate_gate(S.ACTIVE, performance_gate=0.5)
    assert not result.passed and result.reason.startswith("never evaluated")


def test_the_g3_probe_is_dropped_once_compatibility_check_is_left() -> None:
    """The probe holds the kernel's output on a whole batch: kept for G3, and no longer."""
    seed = make_seed(S.COMPATIBILITY_CHECK)
    seed(torch.randn(64, C))
    assert seed.probe_result is not None
    assert copy.deepcopy(seed).probe_result is None  # a measurement of this seed's kernel
    assert seed.probe_result is not None  # the original keeps it for its G3
    seed.transition_to(S.GRAFTING)
    assert seed.probe_result is None
    for stage in (S.STABILIZATION, S.ACTIVE):
        seed.transition_to(stage)
        seed(torch.randn(64, C))
        assert seed.probe_result is None


def test_a_seed_materialised_from_meta_gets_its_alpha_and_flags_back() -> None:
    """``to_empty`` from meta leaves uninitialised buffers: a standalone seed got its alpha
    back but not its flags, and a set fault flag charged a DORMANT seed a fault."""
    seed = make_seed(S.GRAFTING)
    seed.update_alpha_blending(1, 4)
    alpha = seed.alpha.clone()
    seed.to("meta")
    assert seed.state_table.state_tensor.device.type == "cpu"  # the lifecycle keeps its data
    for buffer in (seed._buffers["finite_flag"], seed._buffers["fault_flag"]):
        assert buffer.is_meta
    seed.to_empty(device="cpu")
    assert torch.equal(seed.alpha, alpha) and alpha.item() > 0
    assert seed.finite_flag.item() and not seed.fault_flag.item()
