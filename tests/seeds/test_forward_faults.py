"""Fault containment in the forward: however a seed's kernel fails there, the host's step
completes.

Each fault (a raise, a raise on some calls only, wrong shape, wrong dtype, a tuple, NaN and inf)
is checked on a stand-alone seed and in a KasminaLayer with seeds in several stages, in train and
eval mode: the host's output is bitwise the host-only output where a seed faulted, the host's
parameters get finite gradients and an optimizer step moves them, and the fault is counted, kept
in the seed's fault log and sent as telemetry. A host chunk that is not finite is no fault of its
seed and leaves a kernel's statistics as they were.

What a fault costs the seed is in test_fault_accounting.py, faults under ``torch.compile`` in
test_compiled_faults.py, a kernel whose backward raises in test_backward_faults.py.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kasmina.seeds import faults
from kasmina.seeds.faults import fallback_per_chunk
from kasmina.seeds.gates import ProbeFault
from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.fault_helpers import (
    BATCH,
    RUNNING,
    C,
    Flaky,
    Net,
    NonFinite,
    Overflows,
    Raises,
    ReturnsTuple,
    WrongShape,
    assert_host_trained,
    fault_events,
    four_stage_layer,
    make_seed,
    reporting_table,
    train_step,
)
from tests.seeds.helpers import PATH, walk

S = SeedStage


class WrongDtype(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).double()


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


# ------------------------------------------------------------------------------- KasminaLayer


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


class _OwnCheck(nn.Module):
    """A kernel whose own code raises torch's batch-norm message: its fault, not torch's check."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 1:
            raise ValueError("Expected more than 1 value per channel when training")
        return x


@pytest.mark.parametrize(
    "stage", [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.STABILIZATION], ids=lambda s: s.name
)
def test_a_train_mode_batch_norm_sits_out_a_batch_of_one_and_is_not_charged(stage) -> None:
    """Torch's batch norm refuses one value per channel in train mode, as a dataset's last batch
    of one sample gives it: the data's shape, not the kernel's fault (an exported kernel's
    batch norm computes on it). Charged, three epochs' last batches quarantined a healthy
    plain-module kernel. The host's output stands in there; a kernel's own ``ValueError`` of
    the same words is still its fault."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    norm, own = layer.seed(0), layer.seed(1)
    norm.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    own.attach_kernel(_OwnCheck())
    for seed in (norm, own):
        walk(seed, stage)
    for _ in range(3):
        x = torch.randn(1, 6)
        out = layer(x)
        assert torch.equal(out[:, :2], layer.host(x)[:, :2])
        out.sum().backward()
    assert norm.faults == 0 and norm.stage == stage
    assert own.faults == 3 and own.stage == S.QUARANTINE
    x = torch.randn(4, 6)
    layer(x).sum().backward()  # a batch it can take runs the kernel again
    assert norm.faults == 0
    if stage == S.COMPATIBILITY_CHECK:  # probed (its statistics put back), not a fault
        assert norm.probe_result is not None and not isinstance(norm.probe_result, ProbeFault)
    else:
        assert norm.kernel[1].num_batches_tracked > 0


def test_each_kernels_first_batch_of_one_is_logged_whatever_others_sat_out(caplog) -> None:
    """A sat-out batch of one was counted for the process, for its rate-limited log: once one
    manager's seed had sat one out, another's (a sweep's next trial, the next model a notebook
    builds) were logged at DEBUG only, its first included. Each kernel counts its own, as an
    exported program's input checks do."""
    torch.manual_seed(0)
    layers = [KasminaLayer(nn.Linear(6, 4), 2, 2) for _ in range(2)]
    for layer in layers:
        layer.seed(0).attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        walk(layer.seed(0), S.ISOLATED_INIT)
    with caplog.at_level(logging.WARNING, logger=faults.__name__):
        for layer in layers:
            for _ in range(2):
                layer(torch.randn(1, 6)).sum().backward()
    said = [r.levelno for r in caplog.records if "sat out a call" in r.getMessage()]
    assert said == [logging.WARNING, logging.WARNING]  # each kernel's first; its second: DEBUG
    assert all(layer.seed(0).faults == 0 for layer in layers)


class _OneRow(nn.Module):
    """A kernel whose own reshape hands its batch norm one value per channel, whatever the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(2, 2), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lin(x).reshape(1, -1)).reshape(x.shape)


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK], ids=lambda s: s.name)
def test_a_batch_norm_refusal_on_a_batch_of_several_is_the_kernels_fault(stage) -> None:
    """Torch's one-value refusal is the data's only on an input of one sample: a kernel whose
    own reshape makes one row of a batch of two raises it on every batch; sat out, it never
    trained, never was charged, never left its stage."""
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    seed = layer.seed(0)
    seed.attach_kernel(_OneRow())
    walk(seed, stage)
    for _ in range(3):
        layer(torch.randn(2, 6)).sum().backward()
    assert seed.faults == 3 and seed.stage == S.QUARANTINE


def test_torch_still_has_the_one_value_checks_the_guard_knows() -> None:
    """The refusal is told by torch's own check functions: a torch that renamed them would
    charge every batch of one again, unnoticed."""
    assert len(faults._ONE_VALUE_CHECKS) == 2


class _PooledNorm(nn.Module):
    """A kernel that normalizes a sequence-first input's mean over time: one value per channel
    on a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(x.mean(0)).unsqueeze(0)


def test_a_sequence_first_batch_of_one_is_sat_out_too() -> None:
    """``[T, B, F]`` (``nn.Transformer``'s and ``nn.LSTM``'s default layout) with B = 1: the
    refusal is the data's, though the input's leading size is T."""
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    seed = layer.seed(0)
    seed.attach_kernel(_PooledNorm())
    walk(seed, S.ISOLATED_INIT)
    for _ in range(3):
        layer(torch.randn(5, 1, 6)).sum().backward()
    assert seed.faults == 0 and seed.stage == S.ISOLATED_INIT
    layer(torch.randn(5, 3, 6)).sum().backward()
    assert seed.faults == 0 and seed.kernel.norm.running_mean.abs().sum() > 0  # it ran


class SetsGradMode(nn.Module):
    """Calls ``torch.set_grad_enabled(enabled)`` as a function (it stays set: no block), then
    works, or raises (``raises``): a kernel that leaves the global grad mode changed."""

    def __init__(self, width: int, enabled: bool, raises: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.enabled, self.raises = enabled, raises

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.set_grad_enabled(self.enabled)
        if self.raises:
            raise RuntimeError("failed after changing grad mode")
        return self.lin(x)


@pytest.mark.parametrize("raises", [False, True], ids=["returns", "raises"])
@pytest.mark.parametrize("stage", RUNNING, ids=lambda s: s.name)
def test_a_kernel_that_leaves_grad_mode_changed_has_it_put_back(
    x: torch.Tensor, stage: SeedStage, raises: bool
) -> None:
    """A kernel that turns grad off in a training forward: the host's layers after the slot
    recorded no graph and its backward raised. Grad mode is put back after the kernel's call,
    so the host's step completes; one that turns grad on in a validation forward under
    ``no_grad`` leaves the host's later layers recording nothing either."""
    net = Net(make_seed(SetsGradMode(C, enabled=False, raises=raises), stage))
    before = {n: p.detach().clone() for n, p in net.host_parameters().items()}
    train_step(net, x)  # the host's backward and step complete
    assert torch.is_grad_enabled()
    # Upstream gets a gradient through the host's chunk (a fault, the straight-through
    # incubate); the kernel's output, made with grad off, passes it none.
    upstream = {"up.weight", "up.bias"} if raises or stage == SeedStage.ISOLATED_INIT else set()
    assert_host_trained(net, before, upstream | {"down.weight", "down.bias"})
    net.seed.kernel.enabled = True
    with torch.no_grad():
        out = net(x)
        assert not torch.is_grad_enabled()
    assert not out.requires_grad


def test_an_output_on_another_device_than_the_host_is_a_device_fault() -> None:
    """The output check compares devices (two CPU tensors pass without building one): a kernel's
    output on ``meta`` beside a CPU host, or the other way round, is a ``device`` fault."""
    cpu, meta = torch.zeros(2, 3), torch.zeros(2, 3, device="meta")
    assert faults.output_fault(cpu, torch.ones(2, 3)) is None
    assert faults.output_fault(meta, torch.zeros(2, 3, device="meta")) is None
    for out, host in ((meta, cpu), (cpu, meta)):
        found = faults.output_fault(out, host)
        assert found is not None and found[0] == "device", found
