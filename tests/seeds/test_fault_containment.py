"""Fault containment: however a seed's kernel fails in its forward, the host's step completes.

Every fault is injected for real, with small modules as kernels: one that raises, one that
raises on some calls only, wrong shape, wrong dtype, a tuple, NaN and inf. Each is checked on a
stand-alone seed and in a KasminaLayer with seeds in several stages, in train and eval mode:
the host's output is bitwise the host-only output where a seed faulted, the host's parameters
get finite gradients and an optimizer step moves them, and the fault is counted, logged, kept
in the seed's fault log and sent as telemetry. QUARANTINE comes exactly at ``fault_limit``
(never for an ACTIVE seed), RECYCLING forgets the faults and checkpoints keep them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kasmina.seeds import island
from kasmina.seeds.compiled_cut import CUT_REASON
from kasmina.seeds.extra_state import decode_extra_state
from kasmina.seeds.faults import (
    FAULT_LOG_SIZE,
    FAULT_REASON_CHARS,
    call_kernel,
    fallback_per_chunk,
    short_reason,
)
from kasmina.seeds.gates import ProbeFault
from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage
from kasmina.utils import flags as flags_module
from kasmina.utils.telemetry import MemorySink, TelemetryReporter
from tests.profiling import DispatchedOps
from tests.seeds.helpers import MLP
from tests.urza.helpers import PairRows

S = SeedStage
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]
RUNNING = [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION, S.ACTIVE]
QUARANTINABLE = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION]
C = 3  # the stand-alone seed's chunk width
BATCH = 5


# ----------------------------------------------------------------------------- faulty kernels


class Raises(nn.Module):
    """Does real work, then fails: a kernel with a bug in its forward."""

    def __init__(self, width: int, message: str = "kernel exploded") -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.message = message

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.lin(x)
        raise RuntimeError(self.message)


class Flaky(nn.Module):
    """A healthy Linear + Tanh, except on the calls (1-based) in ``bad_calls``, where it raises."""

    def __init__(self, width: int, bad_calls: set[int]) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.bad_calls = bad_calls
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.bad_calls:
            raise ValueError(f"bad batch {self.calls}")
        return torch.tanh(self.lin(x))


class WrongShape(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class WrongDtype(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).double()


class ReturnsTuple(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.lin(x)
        return y, y


class NonFinite(nn.Module):
    """Right shape and dtype, but every element is ``value`` (NaN or inf)."""

    def __init__(self, width: int, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.value


class Overflows(nn.Module):
    """``x + eps * exp(w * x)``: finite on small inputs, inf where ``x`` exceeds about 89; its
    backward then meets ``0 * inf`` (NaN) in the zero gradient a fallback gives it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))
        self.eps = nn.Parameter(torch.full((width,), 1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.eps * torch.exp(self.w * x)


Kernel = Callable[[int], nn.Module]

# (kernel factory, telemetry kind, fault_log reason for a (BATCH, C) float32 host chunk)
HOST_SIDE_FAULTS: list[tuple[Kernel, str, str]] = [
    (Raises, "exception", "raised RuntimeError: kernel exploded"),
    (
        WrongShape,
        "shape",
        f"output ({BATCH}, {C + 1})/torch.float32 does not match host ({BATCH}, {C})/torch.float32",
    ),
    (
        WrongDtype,
        "dtype",
        f"output ({BATCH}, {C})/torch.float64 does not match host ({BATCH}, {C})/torch.float32",
    ),
    (ReturnsTuple, "type", "output tuple is not a Tensor"),
]
FAULT_IDS = ["raises", "shape", "dtype", "tuple"]


# ----------------------------------------------------------------------------------- helpers


def reporting_table(num_seeds: int) -> tuple[GPUStateTensor, MemorySink]:
    sink = MemorySink()
    return GPUStateTensor(num_seeds, "cpu", telemetry=TelemetryReporter(sinks=[sink])), sink


def fault_events(sink: MemorySink) -> list[dict[str, str]]:
    return [dict(metric.labels) for metric in sink.events("seed.fault")]


def walk(seed: GradientIsolatedSeed, stage: SeedStage) -> None:
    for step in PATH[: PATH.index(stage) + 1]:
        seed.transition_to(step)


def make_seed(
    kernel: nn.Module,
    stage: SeedStage,
    state: GPUStateTensor | None = None,
    fault_limit: int = 3,
) -> GradientIsolatedSeed:
    seed = GradientIsolatedSeed(C, "s0", state=state, fault_limit=fault_limit)
    seed.attach_kernel(kernel)
    walk(seed, stage)
    seed.update_alpha_blending(5, 10)  # GRAFTING: alpha 0.5; a no-op in the other stages
    return seed


class Net(nn.Module):
    """upstream -> seed slot -> downstream; ``Net(None)`` is the host alone, same weights."""

    def __init__(self, seed: GradientIsolatedSeed | None) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.up = nn.Linear(4, C)
        self.down = nn.Linear(C, 2)
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.seed is not None:
            h = self.seed(h)
        return self.down(h)

    def host_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not n.startswith("seed.")}


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(BATCH, 4)


def train_step(net: Net, x: torch.Tensor) -> torch.Tensor:
    """Forward, backward and an SGD step on the host's parameters; returns the output."""
    optimizer = torch.optim.SGD(net.host_parameters().values(), lr=0.1)
    out = net(x)
    out.pow(2).sum().backward()
    optimizer.step()
    return out


def assert_host_trained(net: Net, before: dict[str, torch.Tensor], expect_grad: set[str]) -> None:
    for name, p in net.host_parameters().items():
        if name in expect_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert not torch.equal(p.detach(), before[name]), f"{name} did not move"
        else:
            assert p.grad is None, name


# ------------------------------------------------------------------- stand-alone seed: faults


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("stage", RUNNING)
@pytest.mark.parametrize(("make", "kind", "reason"), HOST_SIDE_FAULTS, ids=FAULT_IDS)
def test_a_host_side_fault_passes_the_host_through_and_the_step_completes(
    x: torch.Tensor, make: Kernel, kind: str, reason: str, stage: SeedStage, mode: str
) -> None:
    table, sink = reporting_table(1)
    seed = make_seed(make(C), stage, table)
    net, bare = Net(seed), Net(None)
    if mode == "eval":
        net.eval()
        with torch.no_grad():
            assert torch.equal(net(x), bare(x))
    else:
        before = {n: p.detach().clone() for n, p in net.host_parameters().items()}
        out = net(x)
        bare_out = bare(x)
        bare_out.pow(2).sum().backward()
        out.pow(2).sum().backward()
        assert torch.equal(out, bare_out)
        # Exactly as if the seed passed the host through: the host-only gradients, bit for bit.
        for name, q in bare.host_parameters().items():
            assert torch.equal(net.host_parameters()[name].grad, q.grad), name
        torch.optim.SGD(net.host_parameters().values(), lr=0.1).step()
        assert_host_trained(net, before, {"up.weight", "up.bias", "down.weight", "down.bias"})
    assert seed.stage is stage and seed.faults == 1
    assert list(seed.fault_log) == [reason]
    assert fault_events(sink) == [{"seed_id": "s0", "kind": kind, "stage": stage.name}]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("stage", RUNNING)
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_non_finite_output_falls_back_on_the_device_and_is_a_fault_at_the_poll(
    x: torch.Tensor, value: float, stage: SeedStage, mode: str
) -> None:
    table, sink = reporting_table(1)
    seed = make_seed(NonFinite(C, value), stage, table)
    net, bare = Net(seed), Net(None)
    if mode == "eval":
        net.eval()
        with torch.no_grad():
            assert torch.equal(net(x), bare(x))
    else:
        before = {n: p.detach().clone() for n, p in net.host_parameters().items()}
        assert torch.equal(train_step(net, x), bare(x))
        # GRAFTING and STABILIZATION give the upstream host no gradient through the slot, faulty
        # or not (docs/design.md §4); ISOLATED_INIT and ACTIVE do, and it stays finite.
        isolated = stage in (S.GRAFTING, S.STABILIZATION)
        upstream = set() if isolated else {"up.weight", "up.bias"}
        assert_host_trained(net, before, upstream | {"down.weight", "down.bias"})
    assert seed.faults == 0 and not fault_events(sink)  # no sync in the forward: not known yet
    # True: the gradient of the training forward is dropped; a no-grad one recorded none.
    assert seed.poll_nonfinite() is (mode == "train")
    assert seed.faults == 1 and seed.nonfinite_events == 1 and seed.stage is stage
    assert list(seed.fault_log) == ["non-finite output"]
    assert fault_events(sink) == [{"seed_id": "s0", "kind": "nonfinite", "stage": stage.name}]
    assert len(sink.events("seed.nonfinite_output")) == 1
    assert seed.poll_nonfinite() is False and seed.faults == 1


def test_a_kernel_that_fails_on_some_calls_only_faults_on_those(x: torch.Tensor) -> None:
    kernel = Flaky(C, bad_calls={2, 3, 5})
    seed = make_seed(kernel, S.GRAFTING)
    net, bare = Net(seed), Net(None)
    for call in range(1, 7):
        out = net(x)
        h = net.up(x).detach()
        if call in kernel.bad_calls:
            assert torch.equal(out, bare(x)), call
        elif seed.stage is S.GRAFTING:
            with torch.no_grad():
                s = torch.tanh(kernel.lin(h))
            torch.testing.assert_close(out, net.down(0.5 * s + 0.5 * h))
        out.sum().backward()
        assert seed.faults == len([c for c in kernel.bad_calls if c <= call])
        assert seed.stage is (S.QUARANTINE if call >= 5 else S.GRAFTING)
    assert kernel.calls == 5  # quarantined at the third fault: call 6 never reached the kernel
    assert list(seed.fault_log) == [f"raised ValueError: bad batch {c}" for c in (2, 3, 5)]


class RaisesOnOneRow(nn.Module):
    """A healthy Linear + Tanh that raises on a batch of one row (a bug on the short last
    micro-batch): the same in a checkpoint's first run and its recompute."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            raise ValueError("one row")
        return torch.tanh(self.lin(x))


@pytest.mark.parametrize("reentrant", [False, True], ids=["plain", "reentrant-checkpoint"])
@pytest.mark.parametrize("stage", RUNNING)
def test_a_call_that_faults_in_one_micro_batch_costs_the_seed_the_whole_step(
    x: torch.Tensor, stage: SeedStage, reentrant: bool
) -> None:
    """Gradient accumulation over three micro-batches, the kernel raising on the last: the
    poll kept the other two's gradients, so the step trained the seed (and moved a GRAFTING
    seed's alpha) on part of its batch, where one batch of all three would have trained it
    on nothing, and a non-finite output or a backward that raised cost the whole step. The
    poll now drops every gradient since the last one, the raise charged once; so in a
    reentrant checkpoint, whose first run has no grad and whose recompute skips the call. A
    validation forward under ``no_grad`` that faults records no gradient: the step's stay."""
    seed = make_seed(RaisesOnOneRow(C), stage)
    net = Net(seed)

    def body(h: torch.Tensor) -> torch.Tensor:
        return net.down(seed(h))

    for part in x.tensor_split(3):  # 2, 2 and 1 rows
        h = net.up(part)
        out = checkpoint(body, h, use_reentrant=True) if reentrant else body(h)
        out.pow(2).sum().backward()
    assert seed.faults == 1 and all(p.grad is not None for p in seed.trained_parameters())
    assert seed.poll_nonfinite() is True  # fell back with grad: the step skips the seed
    assert all(p.grad is None for p in seed.trained_parameters())
    assert seed.faults == 1 and seed.stage is stage
    net(x).pow(2).sum().backward()
    with torch.no_grad():
        net(x[:1])  # raises, in a validation forward
    assert seed.faults == 2 and seed.poll_nonfinite() is False
    assert all(p.grad is not None for p in seed.trained_parameters())


# --------------------------------------------------------------------------- fault limit


@pytest.mark.parametrize("limit", [1, 2, 3])
@pytest.mark.parametrize("stage", QUARANTINABLE)
def test_quarantine_comes_exactly_at_the_fault_limit(stage: SeedStage, limit: int) -> None:
    table, sink = reporting_table(1)
    kernel = Flaky(C, bad_calls=set(range(1, 100)))
    seed = make_seed(kernel, stage, table, fault_limit=limit)
    h = torch.randn(BATCH, C)
    for n in range(1, limit):
        assert seed(h) is h
        assert seed.faults == n and seed.stage is stage
    assert seed(h) is h
    assert seed.faults == limit and seed.stage is S.QUARANTINE
    assert seed(h) is h and kernel.calls == limit  # a quarantined seed runs nothing
    assert len(fault_events(sink)) == limit
    assert [dict(m.labels)["to"] for m in sink.events("lifecycle.transition")][-1] == "QUARANTINE"


def test_an_active_seed_is_never_quarantined_and_keeps_counting(
    x: torch.Tensor, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = Flaky(C, bad_calls={1, 2, 3, 4, 5, 7})
    seed = make_seed(kernel, S.ACTIVE, fault_limit=2)
    net, bare = Net(seed), Net(None)
    with caplog.at_level(logging.DEBUG, logger="kasmina.seeds.seed"):
        for call in range(1, 8):
            out = net(x)
            if call in kernel.bad_calls:
                assert torch.equal(out, bare(x))
            out.sum().backward()
    assert seed.stage is S.ACTIVE and seed.faults == 6 and kernel.calls == 7
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no quarantine" in errors[0].getMessage()


def test_fault_limit_is_validated_and_given_to_every_seed() -> None:
    for bad in (0, -1, True, 2.5, "3"):
        with pytest.raises(ValueError):
            GradientIsolatedSeed(C, "s", fault_limit=bad)  # type: ignore[arg-type]
    seed = GradientIsolatedSeed(C, "s")
    assert seed.fault_limit == 3
    with pytest.raises(ValueError):
        seed.fault_limit = 0
    assert seed.fault_limit == 3
    seed.fault_limit = 7
    assert seed.fault_limit == 7
    layer = KasminaLayer(nn.Linear(4, 6), 3, 2, fault_limit=5)
    assert [s.fault_limit for s in layer.seeds] == [5, 5, 5]
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
    slots = attach(model, ["0", "2"], 2, 4, fault_limit=4)
    assert [s.fault_limit for slot in slots for s in slot.seeds] == [4, 4, 4, 4]
    with pytest.raises(ValueError):
        KasminaLayer(nn.Linear(4, 6), 3, 2, fault_limit=0)


def test_a_lowered_limit_quarantines_at_the_next_fault() -> None:
    seed = make_seed(Raises(C), S.GRAFTING, fault_limit=10)
    h = torch.randn(BATCH, C)
    for _ in range(4):
        seed(h)
    seed.fault_limit = 2  # already past it: the next fault decides
    assert seed.stage is S.GRAFTING
    seed(h)
    assert seed.faults == 5 and seed.stage is S.QUARANTINE


# ------------------------------------------------------------------------------- KasminaLayer


def four_stage_layer(
    kernels: list[nn.Module], state: GPUStateTensor | None = None
) -> tuple[KasminaLayer, torch.Tensor]:
    """Seeds 0..3 in ISOLATED_INIT, GRAFTING, STABILIZATION, ACTIVE, with the given kernels."""
    torch.manual_seed(5)
    layer = KasminaLayer(nn.Linear(6, 8), 4, 2, state=state)
    for k, (stage, kernel) in enumerate(zip(RUNNING, kernels, strict=True)):
        layer.seed(k).attach_kernel(kernel)
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10, 2.0)
    return layer, torch.randn(BATCH, 6)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_layer_whose_seeds_all_fault_gives_the_host_output_and_trains_the_host(
    mode: str,
) -> None:
    table, sink = reporting_table(4)
    torch.manual_seed(11)
    kernels = [Raises(2), WrongShape(2), WrongDtype(2), ReturnsTuple(2)]
    layer, x = four_stage_layer(kernels, table)
    bare = copy.deepcopy(layer.host)
    w = torch.randn(BATCH, 8)
    if mode == "eval":
        layer.eval()
        with torch.no_grad():
            assert torch.equal(layer(x), bare(x))
    else:
        before = layer.host.weight.detach().clone()
        out = layer(x)
        (out * w).sum().backward()
        (bare(x) * w).sum().backward()
        assert torch.equal(out, bare(x))
        assert torch.equal(layer.host.weight.grad, bare.weight.grad)  # every chunk passed through
        assert torch.equal(layer.host.bias.grad, bare.bias.grad)
        torch.optim.SGD(layer.host.parameters(), lr=0.1).step()
        assert torch.isfinite(layer.host.weight).all()
        assert not torch.equal(layer.host.weight.detach(), before)
    assert layer.stages() == RUNNING and [s.faults for s in layer.seeds] == [1, 1, 1, 1]
    assert [e["kind"] for e in fault_events(sink)] == ["exception", "shape", "dtype", "type"]
    assert [e["seed_id"] for e in fault_events(sink)] == [f"layer[{k}]" for k in range(4)]
    assert layer.seed(1).fault_log[0] == (
        f"output ({BATCH}, 3)/torch.float32 does not match host ({BATCH}, 2)/torch.float32"
    )


def test_faulting_seeds_leave_the_healthy_seeds_of_a_layer_exactly_as_they_were() -> None:
    torch.manual_seed(12)
    kernels = [
        nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
        Flaky(2, bad_calls={1}),  # GRAFTING: fails on this call only
        nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
        WrongShape(2),  # ACTIVE
    ]
    layer, x = four_stage_layer(kernels)
    # The reference: the same layer with the two faulty seeds holding no kernel (pass-through).
    reference = copy.deepcopy(layer)
    reference.seed(1).detach_kernel()
    reference.seed(3).detach_kernel()
    w = torch.randn(BATCH, 8)
    out, ref = layer(x), reference(x)
    assert torch.equal(out, ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.equal(layer.host.weight.grad, reference.host.weight.grad)
    for k in (0, 2):  # the healthy seeds trained exactly as in the reference
        for p, q in zip(
            layer.seed(k).seed_parameters(), reference.seed(k).seed_parameters(), strict=True
        ):
            assert p.grad is not None and torch.equal(p.grad, q.grad)
    assert [s.faults for s in layer.seeds] == [0, 1, 0, 1]
    # The next call, the flaky seed is healthy again and blends in.
    assert not torch.equal(layer(x)[:, 2:4], layer.host(x)[:, 2:4])
    assert layer.seed(1).faults == 1


@pytest.mark.parametrize("stage", RUNNING)
def test_anomaly_detection_meets_no_nan_of_a_contained_seed(
    x: torch.Tensor, stage: SeedStage
) -> None:
    """Under ``set_detect_anomaly(True)`` the kernel's backward still ran on the zero gradient
    its fallback gave it: ``0 * inf`` made NaN there, and anomaly mode raised out of the host's
    backward (ACTIVE) or charged a second fault for one bad batch ("backward raised")."""
    table, sink = reporting_table(1)
    seed = make_seed(Overflows(C), stage, table)
    net, bare = Net(seed), Net(None)
    big = x * 1000  # the slot's activations reach hundreds: exp overflows
    with torch.autograd.set_detect_anomaly(True):
        assert torch.equal(train_step(net, big), bare(big))
    assert all(p.grad is None or p.grad.isfinite().all() for p in net.parameters())
    seed.poll_nonfinite()
    assert seed.faults == 1 and list(seed.fault_log) == ["non-finite output"]
    assert fault_events(sink) == [{"seed_id": "s0", "kind": "nonfinite", "stage": stage.name}]
    with torch.autograd.set_detect_anomaly(True, check_nan=False):  # as without anomaly mode
        train_step(net, big)
    assert seed.faults == 1 and seed.poll_nonfinite() and seed.faults == 2


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.ACTIVE])
def test_anomaly_detection_leaves_per_sample_gradients_working(stage: SeedStage) -> None:
    """The anomaly check read the kernel's output on the host, which ``vmap`` refuses for a
    batched tensor ("calling .item()"): per-sample gradients broke under anomaly mode."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(4, C), nn.ReLU(), nn.Linear(C, C))
    (layer,) = attach(net, ["2"], 1, C)
    net(torch.randn(2, 4))
    layer.seed(0).attach_kernel(nn.Linear(C, C))
    walk(layer.seed(0), stage)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(net, p, (x,)).pow(2).sum()

    x = torch.randn(BATCH, 4)
    with torch.autograd.set_detect_anomaly(True):
        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    assert all(g.shape[0] == BATCH for g in grads.values()) and layer.seed(0).faults == 0


def test_non_finite_seeds_in_every_stage_of_a_layer_fall_back_per_chunk() -> None:
    table, sink = reporting_table(4)
    torch.manual_seed(13)
    nan, inf = float("nan"), float("inf")
    kernels = [NonFinite(2, nan), NonFinite(2, inf), NonFinite(2, nan), NonFinite(2, inf)]
    layer, x = four_stage_layer(kernels, table)
    before = layer.host.weight.detach().clone()
    out = layer(x)
    assert torch.equal(out, layer.host(x))
    out.sum().backward()
    grad = layer.host.weight.grad
    assert torch.isfinite(grad).all() and grad[0:2].abs().sum() > 0 and grad[6:8].abs().sum() > 0
    assert not grad[2:6].any()  # GRAFTING, STABILIZATION: no host gradient through the slot
    torch.optim.SGD(layer.host.parameters(), lr=0.1).step()
    assert not torch.equal(layer.host.weight.detach(), before)
    assert [s.faults for s in layer.seeds] == [0, 0, 0, 0]
    assert layer.poll_nonfinite() == [f"layer[{k}]" for k in range(4)]
    assert [s.faults for s in layer.seeds] == [1, 1, 1, 1]
    assert {e["kind"] for e in fault_events(sink)} == {"nonfinite"}


@pytest.mark.parametrize("stage", [*RUNNING, S.COMPATIBILITY_CHECK])
def test_a_host_chunk_that_is_not_finite_is_no_fault_of_its_seed(stage: SeedStage) -> None:
    """The seed's input is the host's chunk: NaN there (a diverging host, an fp16 overflow) makes
    the seed's output NaN too, but that is the host's, and charging it quarantined healthy
    seeds while the step was skipped for the host's gradients. It still falls back and loses
    this step's (NaN) gradient; a seed whose own output is non-finite on a finite chunk is
    charged, in the same call."""
    torch.manual_seed(17)
    layer = KasminaLayer(nn.Linear(6, 8), 4, 2)
    kernels = [nn.Linear(2, 2), NonFinite(2, float("nan")), nn.Linear(2, 2), nn.Linear(2, 2)]
    for k, kernel in enumerate(kernels):
        layer.seed(k).attach_kernel(kernel)
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10, 2.0)
    with torch.no_grad():
        layer.host.weight[0, 0] = float("nan")  # host feature 0 (seed 0's chunk) only
    x = torch.randn(BATCH, 6)
    layer(x).sum().backward()
    assert layer.poll_nonfinite() == ["layer[0]", "layer[1]"]  # both fell back
    assert [s.faults for s in layer.seeds] == [0, 1, 0, 0]  # one charged
    assert all(p.grad is None for p in layer.seed(0).kernel.parameters())  # NaN: dropped
    assert layer.poll_nonfinite() == []  # settled
    seed = make_seed(nn.Linear(C, C), stage if stage in PATH else S.GRAFTING)
    seed(torch.full((BATCH, C), float("inf"), requires_grad=True)).sum().backward()  # alone
    assert seed.poll_nonfinite() and seed.faults == 0


@pytest.mark.parametrize("stage", RUNNING)
def test_a_host_batch_that_is_not_finite_leaves_a_kernels_statistics_as_they_were(
    stage: SeedStage,
) -> None:
    """A kernel with batch norm, fed one host batch with a NaN in training: its running
    statistics went NaN for good, and every later call in eval mode returned NaN, a fault
    charged to the seed each time until it was quarantined, for what the host fed it once.
    The statistics stay as they were; the next finite batch updates them; no fault."""
    torch.manual_seed(19)
    layer = KasminaLayer(nn.Linear(6, 8), 4, 2)
    for k in range(4):
        layer.seed(k).attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        walk(layer.seed(k), stage)
    norms = [seed.kernel[1] for seed in layer.seeds]
    x = torch.randn(BATCH, 6)
    layer(x).sum().backward()  # a backward through batch norm: no version moved under it
    before = [(n.running_mean.clone(), n.running_var.clone()) for n in norms]
    bad = x.clone()
    bad[0, 0] = float("nan")  # every chunk's output goes NaN through the host's Linear
    layer(bad).sum().backward()
    assert layer.poll_nonfinite() and [s.faults for s in layer.seeds] == [0, 0, 0, 0]
    for n, (mean, var) in zip(norms, before, strict=True):
        assert torch.equal(n.running_mean, mean) and torch.equal(n.running_var, var)
    layer(x).sum().backward()
    moved = [
        not torch.equal(n.running_mean, mean) for n, (mean, _) in zip(norms, before, strict=True)
    ]
    assert all(moved)
    assert all(torch.isfinite(n.running_mean).all() for n in norms)
    layer.eval()
    with torch.no_grad():
        for _ in range(4):
            layer(x)
            layer.poll_nonfinite()
    assert [s.faults for s in layer.seeds] == [0, 0, 0, 0]
    assert all(seed.stage == stage for seed in layer.seeds)


class RunningMin(nn.Module):
    """A kernel keeping a running minimum that starts at infinity (a calibration observer)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(C, C)
        self.register_buffer("low", torch.full((C,), float("inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        self.low.copy_(torch.minimum(self.low, y.detach().amin(0)))
        return y


def test_a_buffer_that_was_not_finite_before_a_call_is_the_calls_to_write() -> None:
    """The guard puts back only elements a call made non-finite: a minimum that starts at
    infinity takes its first values."""
    seed = make_seed(RunningMin(), S.GRAFTING)
    x = torch.randn(BATCH, C)
    seed(x)
    assert torch.isfinite(seed.kernel.low).all() and seed.faults == 0
    low = seed.kernel.low.clone()
    seed(torch.full((BATCH, C), float("-inf")))  # the host's: -inf, then NaN through the Linear
    assert torch.equal(seed.kernel.low, low) and seed.faults == 0


# --------------------------------------------------------------- COMPATIBILITY_CHECK probe


def test_probe_faults_are_contained_and_g3_says_why() -> None:
    h = torch.randn(BATCH, C, requires_grad=True)
    sample = torch.randn(2, C)

    raising = make_seed(Raises(C), S.COMPATIBILITY_CHECK)
    assert raising(h) is h and raising.faults == 1
    assert raising.probe_result == ProbeFault("raised RuntimeError: kernel exploded")
    gate = raising.evaluate_gate(sample=sample, latency_budget_ms=1e3)
    assert not gate.passed and gate.reason == (
        "compatibility probe faulted: raised RuntimeError: kernel exploded"
    )
    assert raising.faults == 1  # G3's own probe (of the sample): its reason, not a fault

    tuple_out = make_seed(ReturnsTuple(C), S.COMPATIBILITY_CHECK)
    assert tuple_out(h) is h and list(tuple_out.fault_log) == ["output tuple is not a Tensor"]

    wide = make_seed(WrongShape(C), S.COMPATIBILITY_CHECK)
    assert wide(h) is h and wide.faults == 1
    assert wide.probe_result is not None  # kept, so that G3 names the mismatch
    assert "shape" in wide.evaluate_gate(latency_budget_ms=1e3).reason

    nan = make_seed(NonFinite(C, float("nan")), S.COMPATIBILITY_CHECK)
    assert nan(h) is h and nan.faults == 0
    assert nan.poll_nonfinite() is True and nan.faults == 1
    assert not nan.evaluate_gate(latency_budget_ms=1e3).passed


# ------------------------------------------------------------------------ bookkeeping, state


def test_recycling_forgets_the_faults() -> None:
    seed = make_seed(Raises(C), S.GRAFTING, fault_limit=2)
    h = torch.randn(BATCH, C)
    seed(h)
    seed(h)
    assert seed.stage is S.QUARANTINE
    seed.transition_to(S.HARVESTING)
    assert seed.field_report is not None and seed.field_report["faults"] == 2
    assert seed.field_report["last_fault"] == "raised RuntimeError: kernel exploded"
    seed.transition_to(S.COOLDOWN)
    seed.transition_to(S.RECYCLING)
    assert seed.faults == 0 and not seed.fault_log and seed.nonfinite_events == 0


def test_recycling_clears_a_pending_non_finite_flag() -> None:
    seed = make_seed(NonFinite(C, float("nan")), S.GRAFTING)
    seed(torch.randn(BATCH, C))
    seed.transition_to(S.HARVESTING)
    seed.transition_to(S.COOLDOWN)
    seed.transition_to(S.RECYCLING)
    assert seed.poll_nonfinite() is False and seed.faults == 0


def test_faults_and_fault_log_survive_a_state_dict_round_trip() -> None:
    seed = make_seed(Flaky(C, bad_calls={1, 3}), S.GRAFTING)
    h = torch.randn(BATCH, C)
    for _ in range(3):
        seed(h)
    saved = seed.state_dict()
    clone = make_seed(Flaky(C, bad_calls=set()), S.ISOLATED_INIT)
    clone.load_state_dict(saved)
    assert clone.stage is S.GRAFTING and clone.faults == 2
    assert list(clone.fault_log) == [
        "raised ValueError: bad batch 1",
        "raised ValueError: bad batch 3",
    ]

    old = dict(decode_extra_state(saved["_extra_state"]))  # saved before faults were counted
    del old["faults"], old["fault_log"]
    clone.set_extra_state(old)
    assert clone.faults == 0 and not clone.fault_log

    for bad in (
        dict(decode_extra_state(saved["_extra_state"]), faults=-1, alpha=0.9),
        dict(decode_extra_state(saved["_extra_state"]), fault_log="not a list", alpha=0.9),
    ):
        with pytest.raises(ValueError):
            clone.set_extra_state(bad)
    assert clone.faults == 0 and clone.alpha_value == seed.alpha_value  # nothing was written


def test_the_fault_log_is_bounded_and_its_reasons_short() -> None:
    seed = make_seed(Raises(C, message="x" * 5000), S.ACTIVE)
    h = torch.randn(BATCH, C)
    for _ in range(FAULT_LOG_SIZE + 4):
        seed(h)
    assert seed.faults == FAULT_LOG_SIZE + 4 and len(seed.fault_log) == FAULT_LOG_SIZE
    assert all(r.startswith("raised RuntimeError: xxx") and len(r) <= 200 for r in seed.fault_log)


def test_a_reason_of_exactly_the_cap_is_kept_whole() -> None:
    exact = "x" * FAULT_REASON_CHARS
    assert short_reason(exact) == exact
    longer = short_reason(exact + "y")
    assert longer == "x" * (FAULT_REASON_CHARS - 3) + "..." and len(longer) == FAULT_REASON_CHARS
    assert short_reason(" two\n\tlines ") == "two lines"


def test_logging_is_bounded_and_nothing_is_printed(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = make_seed(Raises(C), S.GRAFTING, fault_limit=3)
    h = torch.randn(BATCH, C)
    with (
        caplog.at_level(logging.DEBUG, logger="kasmina.seeds.seed"),
        caplog.at_level(logging.DEBUG, logger="kasmina.seeds.faults"),
    ):
        for _ in range(3):
            seed(h)
    faults = [r for r in caplog.records if "the host output stands in" in r.getMessage()]
    assert [r.levelno for r in faults] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert "kernel exploded" in faults[0].getMessage()
    assert any(
        r.levelno == logging.ERROR and "quarantined" in r.getMessage() for r in caplog.records
    )
    assert capsys.readouterr() == ("", "")


def test_the_guarded_forward_and_backward_never_read_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(14)
    kernels = [
        NonFinite(2, float("nan")),
        Flaky(2, bad_calls={2}),
        WrongShape(2),
        nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
    ]
    layer, x = four_stage_layer(kernels)
    seed = make_seed(Raises(C), S.GRAFTING)
    with DispatchedOps() as mode:
        for _ in range(2):
            layer(x).sum().backward()
            seed(torch.randn(BATCH, C))
    assert mode.scalar_reads == []
    assert [s.faults for s in layer.seeds] == [0, 1, 2, 0] and seed.faults == 2
    transfers: list[int] = []
    read = flags_module._read
    monkeypatch.setattr(flags_module, "_read", lambda f: transfers.append(len(f)) or read(f))
    with DispatchedOps() as mode:
        # The step boundary, one transfer: each seed that fell back in a forward with grad
        # (a non-finite output, a raise, a wrong shape) loses the step's gradient.
        assert layer.poll_nonfinite() == ["layer[0]", "layer[1]", "layer[2]"]
    assert mode.scalar_reads == [] and transfers == [12]  # each seed's finite, fault, cut flags
    assert layer.poll_nonfinite() == [] and transfers == [12, 12]  # settled: clean flags again


# ------------------------------------------------------------------------------- compile


def grafted_mlp(kernel: nn.Module) -> tuple[MLP, KasminaLayer]:
    model = MLP()
    slot = attach(model, "head", 2, 4, fault_limit=100)[0]
    slot.seed(0).attach_kernel(kernel)
    walk(slot.seed(0), S.GRAFTING)
    slot.update_alpha_blending(4, 10)
    return model, slot


def test_compiled_host_with_a_healthy_grafting_seed_matches_eager() -> None:
    torch._dynamo.reset()
    torch.manual_seed(15)
    model, slot = grafted_mlp(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    x = torch.randn(4, 5)
    compiled = torch.compile(model)  # not fullgraph: the guard must not need it
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert all(p.grad is not None for p in slot.seed(0).seed_parameters())
    assert slot.seed(0).faults == 0


@pytest.mark.parametrize(
    "make", [lambda: Flaky(4, bad_calls={2, 4}), lambda: WrongShape(4)], ids=["flaky", "shape"]
)
def test_compiled_host_contains_a_faulting_seed(make: Callable[[], nn.Module]) -> None:
    torch._dynamo.reset()
    torch.manual_seed(16)
    kernel = make()
    model, slot = grafted_mlp(kernel)
    x = torch.randn(4, 5)
    with torch.no_grad():
        host_only = model.head.host(torch.relu(model.encoder(x)))
    compiled = torch.compile(model)
    faulted = 0
    for call in range(1, 5):
        out = compiled(x)
        out.sum().backward()
        bad = not isinstance(kernel, Flaky) or call in kernel.bad_calls
        faulted += bad
        if bad:  # compiled code may round differently from eager: close, not bitwise
            torch.testing.assert_close(out, host_only)
        else:
            assert not torch.allclose(out, host_only), call
        assert slot.seed(0).faults == faulted
    assert slot.seed(0).stage is S.GRAFTING


@pytest.mark.parametrize("stage", [S.GRAFTING, S.ACTIVE], ids=lambda s: s.name)
def test_inductor_keeps_the_non_finite_fallback(stage: SeedStage) -> None:
    """Under the default ``torch.compile`` (Inductor) a NaN output still falls back and is
    counted: the finite test must survive Inductor's algebra (it folds ``0 * v`` to ``0``,
    which made every sum pass as finite)."""
    torch._dynamo.reset()
    model = MLP()
    slot = attach(model, "head", 2, 4, fault_limit=100)[0]
    slot.seed(0).attach_kernel(NonFinite(4, float("nan")))
    walk(slot.seed(0), stage)
    slot.update_alpha_blending(4, 10)
    x = torch.randn(4, 5)
    with torch.no_grad():
        host_only = model.head.host(torch.relu(model.encoder(x)))
    out = torch.compile(model)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :4], host_only[:, :4])
    assert slot.poll_nonfinite() == ["head[0]"]


class _Outputs:
    """A model output object whose field the model overwrites (``ModelOutput``'s habit)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class Projected(nn.Module):
    """CLIP's tail: the tower's output object made first, then its field set to the projection
    of itself (``outputs.pooler_output = self.visual_projection(outputs.pooler_output)``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tower = nn.Linear(5, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Outputs(torch.relu(self.tower(x)))
        out.value = self.proj(out.value)
        return out.value


def test_a_compiled_active_seed_keeps_the_models_attribute_writes() -> None:
    """Compiled, an ACTIVE seed cut its kernel's upstream gradient with a tensor hook, and
    TorchDynamo then dropped the attribute write the model made after the slot: the compiled
    model returned the unprojected tensor (a CLIP's similarity matmul failed on its shape; one
    of the same width would have been silently wrong). Now compiled is eager, gradients too."""
    torch._dynamo.reset()
    model = Projected()
    (slot,) = attach(model, "proj", 2, 2)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x)
    torch.manual_seed(2)
    slot.seed(0).attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    walk(slot.seed(0), S.ACTIVE)
    want = model(x)
    want.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert got.shape == want.shape == (4, 4)
    torch.testing.assert_close(got, want)
    got.pow(2).sum().backward()
    assert grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name)


def test_a_compiled_active_seed_whose_output_overflows_sends_the_host_no_nan() -> None:
    """Compiled, an ACTIVE kernel whose output is not finite falls back to the host's chunk,
    and the ``0 * inf`` its backward makes of the zero gradient stops at its input: the
    host's gradients stay finite, as eager."""
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(4, 2 * C), nn.Linear(2 * C, 2))
    (slot,) = attach(net, ["0"], 2, C, fault_limit=100)
    big = torch.randn(BATCH, 4, generator=torch.Generator().manual_seed(3)) * 1000
    with torch.no_grad():
        net(big)
    slot.seed(0).attach_kernel(Overflows(C))
    walk(slot.seed(0), S.ACTIVE)
    out = torch.compile(net, backend="aot_eager", fullgraph=True)(big)
    out.pow(2).sum().backward()
    host = [p for n, p in net.named_parameters() if ".seeds." not in n]
    assert all(p.grad is not None and p.grad.isfinite().all() for p in host)
    assert slot.poll_nonfinite() == ["0[0]"]


class _InfiniteInputGradient(torch.autograd.Function):
    """The identity, whose backward makes every entry of its input's gradient non-finite."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        """Nothing to keep."""

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("inf")


class InputGradientOverflows(nn.Module):
    """Finite output and finite parameter gradients, but a non-finite gradient into its input:
    what an fp16 overflow of ``g @ W`` (with ``x^T g`` finite) makes of a kernel's backward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(_InfiniteInputGradient.apply(x)))


def active_mlp(kernel: nn.Module) -> tuple[MLP, KasminaLayer, MemorySink]:
    """An MLP whose head's slot holds ``kernel`` as ACTIVE seed 0, its faults reported."""
    model, sink = MLP(), MemorySink()
    table = GPUStateTensor(2, "cpu", telemetry=TelemetryReporter(sinks=[sink]))
    (slot,) = attach(model, "head", 2, 4, fault_limit=100, state=table)
    with torch.no_grad():
        model(torch.randn(4, 5))
    slot.seed(0).attach_kernel(kernel)
    walk(slot.seed(0), S.ACTIVE)
    return model, slot, sink


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_cut_of_a_kernels_own_input_gradient_is_charged(backend: str) -> None:
    """Compiled, an ACTIVE seed's cut zeroes the non-finite gradient its kernel's backward sends
    into the host, where its output was finite: eager passes it on (a GradScaler skips the
    step), compiled the host steps on the finite part. That fault went unseen; now the cut
    sets the seed's cut flag in the backward, and the poll charges it, once."""
    torch._dynamo.reset()
    torch.manual_seed(17)
    model, slot, sink = active_mlp(InputGradientOverflows(4))
    x = torch.randn(4, 5)
    want = model(x)
    out = torch.compile(model, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert all(p.grad.isfinite().all() for p in model.encoder.parameters())  # the cut
    seed = slot.seed(0)
    assert seed.faults == 0 and bool(seed.cut_flag)  # in the backward: no host read there
    assert slot.poll_nonfinite() == []  # its gradient is kept: the output was finite
    assert seed.faults == 1 and list(seed.fault_log) == [CUT_REASON]
    assert fault_events(sink) == [{"seed_id": "head[0]", "kind": "nonfinite", "stage": "ACTIVE"}]
    assert seed.nonfinite_events == 0 and not bool(seed.cut_flag)  # no output fell back
    assert slot.poll_nonfinite() == [] and seed.faults == 1  # settled


def test_eager_passes_a_kernels_own_non_finite_input_gradient_on_uncharged() -> None:
    """Eager is as it was: the host sees the non-finite gradient (its optimizer's checks skip
    the step) and the flags record nothing."""
    model, slot, _ = active_mlp(InputGradientOverflows(4))
    model(torch.randn(4, 5)).sum().backward()
    assert not all(p.grad.isfinite().all() for p in model.encoder.parameters())
    assert slot.poll_nonfinite() == [] and slot.seed(0).faults == 0


@pytest.mark.parametrize("host_overflows", [False, True], ids=["healthy", "host_overflows"])
def test_a_compiled_cut_charges_no_healthy_seed(host_overflows: bool) -> None:
    """A healthy compiled ACTIVE seed is charged nothing, nor one whose non-finite input
    gradient came from above (the host's own overflow, a GradScaler's scale still too high):
    the gradient into its output was not finite, so the zeroed entries are not its own."""
    torch._dynamo.reset()
    torch.manual_seed(18)
    model, slot, sink = active_mlp(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(torch.randn(4, 5))
    (out * (float("inf") if host_overflows else 1.0)).sum().backward()
    assert not bool(slot.seed(0).cut_flag)
    assert slot.poll_nonfinite() == [] and slot.seed(0).faults == 0 and not fault_events(sink)


def test_a_compiled_cut_of_the_hosts_own_non_finite_input_charges_no_seed() -> None:
    """A NaN in the host's activations reaches an ACTIVE kernel's input: whatever the cut
    zeroes there is the host's, not the seed's (as a fallback on the host's NaN is charged to
    no one)."""
    torch._dynamo.reset()
    torch.manual_seed(20)
    model, slot, sink = active_mlp(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    x = torch.randn(4, 5)
    x[0, 0] = float("nan")
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).nan_to_num().sum().backward()
    assert not bool(slot.seed(0).cut_flag)
    slot.poll_nonfinite()
    assert slot.seed(0).faults == 0 and not fault_events(sink)


@pytest.mark.parametrize("how", ["two_forwards", "retained"])
def test_a_compiled_cut_takes_a_second_backward_through_its_graph(how: str) -> None:
    """Every backward writes the cut flag: saved for the backward, its version was checked at
    the next unpack, so a second backward through the same compiled graph (the seed-only KD
    backward, then the task loss's; two forwards and one backward) raised that it had been
    modified in place. The flag is set by either, and charged once."""
    torch._dynamo.reset()
    torch.manual_seed(21)
    model, slot, _ = active_mlp(InputGradientOverflows(4))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    if how == "two_forwards":
        (compiled(torch.randn(4, 5)).sum() + compiled(torch.randn(4, 5)).sum()).backward()
    else:
        out = compiled(torch.randn(4, 5)).sum()
        out.backward(retain_graph=True)
        out.backward()
    assert all(p.grad.isfinite().all() for p in model.encoder.parameters())
    assert bool(slot.seed(0).cut_flag)
    assert slot.poll_nonfinite() == [] and slot.seed(0).faults == 1


def test_a_compiled_cut_of_a_stand_alone_seed_is_charged() -> None:
    """The same for a seed outside a slot: its own cut flag, read by its own poll."""
    torch._dynamo.reset()
    torch.manual_seed(19)
    seed = make_seed(InputGradientOverflows(C), S.ACTIVE)
    net = Net(seed)
    x = torch.randn(BATCH, 4)
    torch.compile(net, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert all(p.grad.isfinite().all() for p in net.up.parameters())
    assert seed.poll_nonfinite() is False
    assert seed.faults == 1 and list(seed.fault_log) == [CUT_REASON]


# ------------------------------------------------------------------- a backward that raises


class _ExplodingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 1.0

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        raise RuntimeError("kernel backward exploded")


class RaisesInBackward(nn.Module):
    """A kernel whose forward is fine and whose backward raises."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ExplodingBackward.apply(x * self.scale)


@pytest.mark.parametrize(
    "stage", [SeedStage.ISOLATED_INIT, SeedStage.GRAFTING, SeedStage.STABILIZATION]
)
def test_a_kernel_whose_backward_raises_is_a_fault_and_the_host_backward_completes(
    x: torch.Tensor, stage: SeedStage
) -> None:
    table, sink = reporting_table(1)
    seed = make_seed(RaisesInBackward(C), stage, table)
    net = Net(seed)
    before = {n: p.detach().clone() for n, p in net.host_parameters().items()}
    train_step(net, x)  # the host's backward and step complete
    # Upstream host layers get a gradient through the slot only in ISOLATED_INIT (the
    # straight-through incubate); GRAFTING and STABILIZATION blend against x.detach().
    upstream = {"up.weight", "up.bias"} if stage == SeedStage.ISOLATED_INIT else set()
    assert_host_trained(net, before, upstream | {"down.weight", "down.bias"})
    assert seed.kernel.scale.grad is None  # the kernel's gradient is lost for this step only
    assert seed.faults == 1 and seed.fault_log[-1].startswith("backward raised RuntimeError")
    assert fault_events(sink) == [{"seed_id": "s0", "kind": "backward", "stage": stage.name}]


@pytest.mark.parametrize(
    "stage", [SeedStage.ISOLATED_INIT, SeedStage.GRAFTING, SeedStage.STABILIZATION]
)
def test_a_raising_backward_is_one_fault_per_forward_however_many_backwards(
    x: torch.Tensor, stage: SeedStage
) -> None:
    """With KD on, the manager's seed-only KD backward and the main one both run through the
    retained guard of one forward: a kernel whose backward raises was charged twice per batch,
    so two bad batches quarantined a seed whose limit is 3. One forward, one fault."""
    net = Net(make_seed(RaisesInBackward(C), stage))
    out = net(x)
    out.sum().backward(retain_graph=True)
    out.pow(2).sum().backward()
    seed = net.seed
    assert seed.faults == 1
    net(x).sum().backward()  # the next forward: its own fault
    assert seed.faults == 2


def test_a_healthy_kernel_gets_the_same_gradient_through_the_guard(x: torch.Tensor) -> None:
    """The guard is an identity for autograd: the seed's parameters get the gradient they
    would get without it (compared with the kernel run by hand on the detached input)."""
    seed = make_seed(nn.Linear(C, C), SeedStage.STABILIZATION)
    h = torch.randn(BATCH, C)
    seed(h).pow(2).sum().backward()
    guarded = [p.grad.clone() for p in seed.kernel.parameters()]
    seed.kernel.zero_grad(set_to_none=True)
    seed.kernel(h.detach()).pow(2).sum().backward()
    params = list(seed.kernel.parameters())
    assert all(torch.equal(a, p.grad) for a, p in zip(guarded, params, strict=True))


def test_without_the_backward_guard_a_raising_backward_reaches_the_host(x: torch.Tensor) -> None:
    """``guard_backward = False`` (``KasminaConfig.guard_seed_backward``) trades the guard's
    cost for this: the kernel's backward error is the host's again."""
    seed = make_seed(RaisesInBackward(C), SeedStage.GRAFTING)
    seed.guard_backward = False
    with pytest.raises(RuntimeError, match="kernel backward exploded"):
        train_step(Net(seed), x)
    assert seed.faults == 0


def test_one_backward_guard_per_layer_faults_only_the_seed_whose_backward_raises() -> None:
    """Every isolated seed of a layer shares one guarded node; when one kernel's backward
    raises, only that seed faults and the others get exactly their unguarded gradients."""
    torch.manual_seed(17)
    kernels = [
        nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
        RaisesInBackward(2),
        nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
        nn.Linear(2, 2),
    ]
    layer, x = four_stage_layer(kernels)
    reference = copy.deepcopy(layer)
    reference.seed(1).detach_kernel()
    for seed in reference.seeds:
        seed.guard_backward = False
    w = torch.randn(BATCH, 8)
    (layer(x) * w).sum().backward()
    (reference(x) * w).sum().backward()
    assert [s.faults for s in layer.seeds] == [0, 1, 0, 0]
    assert layer.seed(1).fault_log[-1].startswith("backward raised RuntimeError")
    assert layer.seed(1).kernel.scale.grad is None
    for k in (0, 2, 3):
        for p, q in zip(
            layer.seed(k).seed_parameters(), reference.seed(k).seed_parameters(), strict=True
        ):
            torch.testing.assert_close(p.grad, q.grad)


def test_a_kernel_shared_by_two_seeds_gets_its_gradient_once() -> None:
    torch.manual_seed(18)
    shared = nn.Linear(2, 2)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    for seed in layer.seeds:
        seed.attach_kernel(shared)
        walk(seed, S.GRAFTING)
    layer.update_alpha_blending(5, 10)
    x = torch.randn(BATCH, 6)
    layer(x).pow(2).sum().backward()
    guarded = [p.grad.clone() for p in shared.parameters()]
    shared.zero_grad(set_to_none=True)
    for seed in layer.seeds:
        seed.guard_backward = False
    layer(x).pow(2).sum().backward()
    for g, p in zip(guarded, shared.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad)


def test_a_kernel_shared_by_two_seeds_gets_both_gradients_when_a_third_backward_raises() -> None:
    """A third seed's backward raises, so the guard goes seed by seed: the kernel the other two
    share still gets the sum of their gradients, exactly what it gets without the guard."""
    torch.manual_seed(19)
    shared = nn.Linear(2, 2)
    layer = KasminaLayer(nn.Linear(6, 6), 3, 2)
    for seed, kernel in zip(layer.seeds, [shared, RaisesInBackward(2), shared], strict=True):
        seed.attach_kernel(kernel)
        walk(seed, S.GRAFTING)
    layer.update_alpha_blending(5, 10)
    reference = copy.deepcopy(layer)  # the shared kernel stays shared in the copy
    reference.seed(1).detach_kernel()
    for seed in reference.seeds:
        seed.guard_backward = False
    x = torch.randn(BATCH, 6)
    layer(x).pow(2).sum().backward()
    reference(x).pow(2).sum().backward()
    assert [s.faults for s in layer.seeds] == [0, 1, 0]
    ref_shared = reference.seed(0).kernel
    assert ref_shared is reference.seed(2).kernel
    for p, q in zip(shared.parameters(), ref_shared.parameters(), strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, q.grad)


def test_a_mixed_slots_grafting_chunk_that_fell_back_blends_with_alpha_zero() -> None:
    """``fallback_per_chunk`` (a slot whose seeds do not all blend): a GRAFTING seed's chunk
    blends with its alpha where its output is finite and with 0 where it fell back; the chunks
    of the other stages do not blend (alpha ``one``)."""
    layer, _ = four_stage_layer([nn.Linear(2, 2) for _ in range(4)])
    seeds, plan = layer.seeds, tuple(RUNNING)
    grafting = seeds[1].alpha
    assert 0 < float(grafting) < 1
    chunks = [torch.randn(BATCH, 2) for _ in range(4)]
    outs = [torch.randn(BATCH, 2) for _ in range(4)]
    outs[1][0, 0] = float("nan")
    inputs = dict(enumerate(chunks))
    one = torch.ones(())
    for ok, want in (
        (None, grafting),
        (torch.tensor([True, True, True, True]), grafting),
        (torch.tensor([True, False, True, True]), torch.zeros(())),
    ):
        full, alphas = fallback_per_chunk(seeds, plan, outs, chunks, inputs, ok, -1, one)
        assert alphas is not None and len(alphas) == 4
        assert alphas[0] is one and alphas[2] is one and alphas[3] is one
        torch.testing.assert_close(alphas[1], want)
        if ok is not None and not ok[1]:
            assert torch.equal(full[:, 2:4], chunks[1])  # the host's chunk in its place
    # Without a GRAFTING seed nothing blends.
    plan = (S.ISOLATED_INIT, S.STABILIZATION, S.STABILIZATION, S.ACTIVE)
    assert fallback_per_chunk(seeds, plan, outs, chunks, inputs, None, -1, one)[1] is None


def test_the_guard_takes_the_direct_engine_entry_even_when_first_asked_inside_a_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine entry point is probed once, on first use, which is inside the host's
    backward where grad mode is off: the probe must still find the entry (it once cached
    "unavailable" there, and every guarded backward took the slower public path)."""
    monkeypatch.setattr(island, "_ENGINE", [])
    public = []
    monkeypatch.setattr(
        island.torch.autograd, "grad", lambda *a, **k: public.append(1) or _public_grad(*a, **k)
    )
    torch.manual_seed(19)
    seed = make_seed(nn.Linear(C, C), SeedStage.GRAFTING)
    seed(torch.randn(BATCH, C, requires_grad=True)).pow(2).sum().backward()
    assert island._ENGINE[0] is not None
    # The probe compares the entry with the public function once; the guard never uses it.
    assert len(public) == 1
    assert all(p.grad is not None for p in seed.kernel.parameters())


@pytest.mark.parametrize("how", ["context", "default"])
def test_the_engine_probe_under_a_meta_default_device_finds_the_entry(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The probe made its tensors on the default device: first asked outside the engine (a
    manager's seed-only KD backward) under a caller's ``torch.device("meta")`` or
    ``set_default_device("meta")``, its comparison raised outside its ``try``, into the guard,
    which charged every isolated seed of that backward a fault and dropped its gradient. It
    computes on the CPU by name, and finds the entry."""
    monkeypatch.setattr(island, "_ENGINE", [])
    if how == "context":
        with torch.device("meta"):
            entry = island._direct_engine()
    else:
        torch.set_default_device("meta")
        try:
            entry = island._direct_engine()
        finally:
            torch.set_default_device(None)  # none set, as before (a "cpu" one is a mode left on)
    assert entry is not None and island._ENGINE == [entry]


_public_grad = torch.autograd.grad


# ------------------------------------------- a call the kernel's exported program refuses


@pytest.fixture(scope="module")
def pair_rows(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], nn.Module]:
    """Loads of a real exported ``PairRows(C)`` (each a seed's own copy, as GERMINATE's)."""
    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.urza.kernel import GPUKernel
    from kasmina.urza.publish import publish_artifact
    from tests.manager.helpers import PUBLISHER

    store = str(tmp_path_factory.mktemp("pairs"))
    torch.manual_seed(0)
    manifest = publish_artifact(PairRows(C), [torch.randn(4, C)], store, "pairs", PUBLISHER)
    client = UrzaLibraryClient(store, PUBLISHER.trusted_publishers())
    payload, verified = client.fetch(manifest.artifact_id)
    return lambda: copy.deepcopy(GPUKernel.from_binary(payload, verified))


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING, S.ACTIVE])
def test_a_call_its_program_refuses_sits_out_without_a_fault(
    pair_rows: Callable[[], nn.Module], stage: SeedStage, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel exported with an even number of rows (its program's input checks say so;
    its signed input shape does not) is called with an odd one (a Hugging Face generate's
    decode step has a sequence length of 1): every such call raised in those checks, a
    fault each, and a healthy seed was quarantined at its third. It sits the call out like
    one its signed shape rules out: the host's chunk stands, no fault, the stage unchanged;
    even calls still run it."""
    model = nn.Sequential(nn.Linear(4, 2 * C))
    (slot,) = attach(model, ["0"], 2, C)
    model(torch.randn(4, 4))
    seed = slot.seed(0)
    seed.attach_kernel(pair_rows())
    walk(seed, stage)
    slot.update_alpha_blending(5, 10)
    for rows in (5, 1, 3, 7):
        x = torch.randn(rows, 4)
        out = model(x)
        out.sum().backward()
        assert torch.equal(out.detach(), slot.host(x).detach()), rows
    assert seed.faults == 0 and seed.stage is stage and list(seed.fault_log) == []
    assert "sat out a call" in caplog.text and "refuse [5, 3]" in caplog.text
    x = torch.randn(6, 4)
    out = model(x)
    if stage is not S.ISOLATED_INIT:  # the seed's chunk is its own again
        assert not torch.equal(out[:, :C], slot.host(x)[:, :C])
    out.sum().backward()
    assert all(p.grad is not None for p in seed.kernel.parameters())
    assert seed.faults == 0 and seed.stage is stage


def test_a_stand_alone_seed_and_its_probe_sit_out_a_call_its_program_refuses(
    pair_rows: Callable[[], nn.Module],
) -> None:
    """Outside a slot as well: the seed passes the host through, and a COMPATIBILITY_CHECK
    probe of such a call keeps the last probe for G3 instead of faulting and leaving none."""
    seed = make_seed(pair_rows(), S.GRAFTING)
    x = torch.randn(BATCH, C)  # an odd number of rows
    assert torch.equal(seed(x), x) and seed.faults == 0
    probing = make_seed(pair_rows(), S.COMPATIBILITY_CHECK)
    probing(torch.randn(4, C))
    probe = probing.probe_result
    assert probe is not None
    for _ in range(probing.fault_limit):
        assert torch.equal(probing(x), x)
    assert probing.probe_result is probe and probing.faults == 0
    assert probing.stage is S.COMPATIBILITY_CHECK


def test_an_exported_batch_norms_statistics_are_kept_finite_too() -> None:
    """An exported program's batch norm sits on plain submodules and its update moves no
    version: the guard never copied its statistics, and one NaN host batch kept them NaN."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    kernel = torch.export.export(module, (torch.randn(4, 2),)).module()
    stats = [b for name, b in kernel.named_buffers() if "running_" in name]
    assert len(stats) == 2
    faults: list[tuple[str, str]] = []
    assert call_kernel(kernel, torch.randn(4, 2), False, lambda *f: faults.append(f)) is not None
    before = [b.clone() for b in stats]
    bad = torch.randn(4, 2)
    bad[0, 0] = float("nan")
    call_kernel(kernel, bad, False, lambda *f: faults.append(f))
    assert all(torch.equal(b, saved) for b, saved in zip(stats, before, strict=True))
    call_kernel(kernel, torch.randn(4, 2), False, lambda *f: faults.append(f))
    assert all(
        torch.isfinite(b).all() and not torch.equal(b, saved)
        for b, saved in zip(stats, before, strict=True)
    )
    assert faults == []
