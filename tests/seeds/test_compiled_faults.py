"""Fault containment under ``torch.compile``.

A compiled host with a healthy GRAFTING seed matches eager; a faulting seed is contained, and
Inductor keeps the non-finite fallback; a compiled ACTIVE seed keeps the model's attribute
writes and sends the host no NaN. The compiled cut of a kernel's own non-finite input gradient
is charged to that seed, once, and to no healthy seed, nor for the host's own non-finite values.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from kasmina.seeds.compiled_cut import CUT_REASON, cut_input, seen_output
from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage
from kasmina.utils.telemetry import MemorySink, TelemetryReporter
from tests.seeds.fault_helpers import (
    BATCH,
    C,
    Flaky,
    Net,
    NonFinite,
    Overflows,
    WrongShape,
    fault_events,
    make_seed,
)
from tests.seeds.helpers import MLP, walk

S = SeedStage


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


# ------------------------------------------------------------------------- the compiled cut


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


def test_the_cut_tests_a_half_gradient_and_input_by_their_fp32_sums() -> None:
    """The cut's own pieces, eager: fp16 entries each finite whose fp16 sum overflows (sixteen
    of 1e4) are a finite gradient into the output and a finite host input, as
    ``faults.all_finite`` sums them. The zeroed input gradient is the kernel's own: flagged."""
    x = torch.full((4, 4), 1e4, dtype=torch.float16, requires_grad=True)
    fault = torch.zeros((), dtype=torch.bool)
    xin, token = cut_input(x, fault)
    out = seen_output(_InfiniteInputGradient.apply(xin), token)
    out.backward(torch.full_like(out, 1e4))
    assert bool(fault) and x.grad is not None and not x.grad.any()


@pytest.mark.parametrize("flagged", [True, False], ids=["flag", "transform"])
def test_a_cut_whose_token_no_output_took_zeroes_and_flags_nothing(flagged: bool) -> None:
    """An input gradient through the cut with no ``seen_output`` on the way (nothing says
    whether the gradient into an output was finite) is cut, never charged; with no flag (under
    a ``torch.func`` transform, which must write nothing outside it) it is the cut alone."""
    x = torch.ones(2, 3, requires_grad=True)
    fault = torch.zeros((), dtype=torch.bool) if flagged else None
    xin, _token = cut_input(x, fault)
    _InfiniteInputGradient.apply(xin).sum().backward()
    assert x.grad is not None and not x.grad.any()
    assert fault is None or not bool(fault)


def test_the_cut_alone_serves_grad_and_vmap() -> None:
    """Compiled under a ``torch.func`` transform (a ``vmap`` of ``grad``: an ensemble's
    per-sample gradients), a seed's input goes through the cut with no flag: it must batch and
    differentiate there, passing a finite gradient and zeroing the rest."""

    def f(row: torch.Tensor) -> torch.Tensor:
        return cut_input(row, None)[0].sqrt().sum()

    got = torch.func.vmap(torch.func.grad(f))(torch.tensor([[0.0, 4.0], [1.0, 0.0]]))
    assert torch.equal(got, torch.tensor([[0.0, 0.25], [0.5, 0.0]]))
