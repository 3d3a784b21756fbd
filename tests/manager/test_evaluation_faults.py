"""A seed that faults or sits out while measured is refused, never measured as harmless.

The host stands in for such a seed, so "with" equals "without": read as a benefit of 0, the
default G5 would fossilize it. A non-finite output (also beside a masked host logit), a raise, a
signed input shape the validation batches do not have, a slot no validation forward reaches and a
counterfactual that makes another seed fault all fail closed; a fault seen while measured is
never counted toward the fault limit.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.manager.evaluation import evaluate_seeds
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.gates import gate_g5_performance
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage
from tests.manager.evaluation_helpers import (
    _TO_STABILIZATION,
    Scale,
    _scaled_seed,
    _stabilizing,
    _static_batch_slot,
)
from tests.manager.helpers import S


class NotFinite(nn.Module):
    """A kernel whose output is NaN on every input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * math.nan


class RaisesOnOdd(Scale):
    """``x * factor``, except on a batch of 7, where it raises."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 7:
            raise RuntimeError("odd batch")
        return super().forward(x)


def test_a_seed_not_finite_on_validation_data_is_refused_not_measured_as_harmless() -> None:
    """The fault guard puts the host's output in place of a NaN, so "with" equals "without":
    read as a benefit of 0, the default gate would fossilize the seed. Non-finite fails closed."""
    slot, registry = _stabilizing(NotFinite())
    seed = slot.seeds[0]
    batches = [(torch.randn(4, 3), torch.randn(4, 6)), (torch.randn(3, 3), torch.randn(3, 6))]

    ev = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]

    assert ev.loss_with == ev.loss_without  # what the guard did
    assert ev.faults == 2 and ev.last_fault == "nonfinite: non-finite output"
    assert math.isnan(ev.benefit) and ev.score == 0.0 and seed.gate_score == 0.0
    result = seed.advance(performance_gate=0.5)  # the default gate
    assert not result.passed and seed.stage == S.STABILIZATION
    assert "faulted while measured, on 2 validation batch(es)" in result.reason
    assert "non-finite" in result.reason
    # The healthy seed beside it is measured as usual; the evaluation left no flag behind.
    assert evaluate_seeds(registry, batches, F.mse_loss)["fc[1]"].faults == 0
    assert bool(seed.finite_flag) and seed.poll_nonfinite() is False and seed.faults == 0


class MaskedHead(nn.Linear):
    """A classifier head whose logit of a disallowed class is -inf on row 0 (the loss stays
    finite where that row's target is another class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x).clone()
        out[0, 1] = -math.inf
        return out


def test_a_nan_seed_beside_a_masked_host_logit_is_refused() -> None:
    """The host's chunk is not finite (a masked logit), so a NaN output there is no fault of
    the seed's in training; the cross-entropy absorbs the -inf and stays finite. Measured, the
    seed still fell back on every row and must read as faulted, never as harmless."""
    torch.manual_seed(0)
    slot = KasminaLayer(MaskedHead(3, 4), 2, 2, layer_id="head")
    registry = SlotRegistry(nn.Sequential(slot), [slot])
    seed = slot.seeds[0]  # columns 0..1, the masked one among them
    seed.attach_kernel(NotFinite())
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        seed.transition_to(stage)
    batches = [(torch.randn(4, 3), torch.tensor([0, 2, 3, 0]))]

    ev = evaluate_seeds(registry, batches, F.cross_entropy)["head[0]"]

    assert math.isfinite(ev.loss_with) and ev.loss_with == ev.loss_without
    assert ev.faults == 1 and ev.last_fault == "nonfinite: non-finite output"
    assert not gate_g5_performance(ev, seed.performance_gate).passed


def test_evaluation_sees_a_fault_without_counting_it_so_it_never_quarantines() -> None:
    """Evaluation changes no stage: a kernel that raises on one validation batch is seen by
    the measurement (once per batch, not once per forward) and never counted toward the
    fault limit, which 1 + C forwards per batch would reach in one evaluation."""
    slot, registry = _stabilizing(RaisesOnOdd(1.5))
    seed = slot.seeds[0]
    batches = [(torch.randn(16, 3), torch.randn(16, 6)), (torch.randn(7, 3), torch.randn(7, 6))]

    ev = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]

    assert seed.stage == S.STABILIZATION and seed.faults == 0 and not seed.fault_log
    assert seed.observed_faults is None
    assert ev.faults == 1 and ev.last_fault == "exception: raised RuntimeError: odd batch"
    assert not gate_g5_performance(ev, 0.0).passed
    # Training forwards still count it.
    slot(torch.randn(7, 3))
    assert seed.faults == 1


def test_a_seed_that_sits_out_the_measuring_forward_is_not_measured_as_harmless() -> None:
    """A kernel whose signed input shape the validation batches do not have sits every one of
    them out: the host stood in, ``loss_with == loss_without``, no fault, and the default G5
    fossilized a seed that wrecks its output at the shapes it trains on. The sit-out counts as
    the host standing in, as a fault does, and G5 refuses; a seed the batch did run is measured."""
    model, registry, slot = _static_batch_slot(-50.0)
    seed = slot.seeds[0]
    ran = evaluate_seeds(registry, [(torch.randn(4, 3), torch.zeros(4, 6))], F.mse_loss)["fc[0]"]
    assert ran.faults == 0 and ran.loss_with > ran.loss_without
    sat = evaluate_seeds(registry, [(torch.randn(5, 3), torch.zeros(5, 6))], F.mse_loss)["fc[0]"]
    assert sat.faults == 1 and sat.last_fault == "sat out every validation batch"
    result = seed.evaluate_gate(S.ACTIVE, performance_gate=0.0)
    assert not result.passed and seed.stage == S.STABILIZATION
    # A partial last batch (no drop_last) is left out of the measurement, not failed: the seed
    # is measured on the batches it ran, and its harm shows.
    batches = [(torch.randn(4, 3), torch.zeros(4, 6)), (torch.randn(3, 3), torch.zeros(3, 6))]
    some = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]
    assert some.faults == 0 and some.samples == 4 and some.loss_with > some.loss_without
    assert slot.sat_out == {}  # the measurement's sit-outs are not the training's to count


@pytest.mark.parametrize("scripted", [False, True], ids=["module", "scripted"])
def test_a_seed_whose_slot_no_validation_forward_reaches_is_never_measured(scripted: bool) -> None:
    """A training-only branch (an auxiliary head): no sit-out was counted, the host stood in,
    "with" equalled "without", and G5 passed a kernel that wrecks its chunk as "no effect".
    A scripted kernel takes no hook, and was taken as run: its slot's forward is watched."""

    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(3, 6)
            self.aux = KasminaLayer(nn.Linear(6, 6), 3, 2, layer_id="aux")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.trunk(x)
            return h + self.aux(h) if self.training else h

    torch.manual_seed(0)
    model = WithAux()
    registry = SlotRegistry(model, [model.aux])
    _scaled_seed(model.aux, -50.0, scripted)
    model(torch.randn(4, 3))  # training: the slot records its shapes
    batches = [(torch.randn(4, 3), torch.randn(4, 6)) for _ in range(3)]
    evaluate_seeds(registry, batches, F.mse_loss)
    gate = model.aux.seeds[0].evaluate_gate(SeedStage.ACTIVE, performance_gate=0.5)
    assert not gate.passed and "sat out every validation batch" in gate.reason
    assert model.training  # put back


def test_a_counterfactual_that_makes_another_seed_fault_fails_closed() -> None:
    """Seed A feeds seed B (a log): with A taken out B's output was NaN, the host stood in for
    B unseen, and A's "without" was "A and B off", read as a benefit. A is refused, naming B."""

    class Const(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones_like(x)

    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)

    torch.manual_seed(0)
    table = GPUStateTensor(4, torch.device("cpu"))
    first, second = KasminaLayer(nn.Linear(3, 4), 2, 2, layer_id="a", state=table), nn.Linear(4, 4)
    with torch.no_grad():
        second.weight.copy_(torch.eye(4))
        second.bias.zero_()
    second = KasminaLayer(second, 2, 2, layer_id="b", state=table, state_offset=2)
    model = nn.Sequential(first, second)
    registry = SlotRegistry(model, [first, second])
    for slot, kernel in ((first, Const()), (second, Log())):
        slot.seeds[0].attach_kernel(kernel)
        for stage in _TO_STABILIZATION:
            slot.seeds[0].transition_to(stage)
    x = torch.randn(8, 3) * 3
    results = evaluate_seeds(registry, [(x, torch.zeros(8, 4))], F.mse_loss)
    assert results["b[0]"].faults == 0  # with A in place, B's input is all ones: log is 0
    assert results["a[0]"].faults == 1
    assert "seed b[0] faulted with this seed taken out" in results["a[0]"].last_fault
    assert not gate_g5_performance(results["a[0]"], 0.5).passed
