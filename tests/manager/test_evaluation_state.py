"""An evaluation leaves the model and its seeds as it found them, and a load drops it.

A kernel's buffers that ``eval()`` cannot switch off are put back (``kept_buffers``), and an
evaluation between a training forward and its backward charges the seed nothing; pending teacher
logits wait it out; modes are put back through ``train()``; each ablation draws what the measured
forward drew; a scripted kernel is measured and no hook is left behind. A load through the seed
drops its evaluation, and a refused load changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.manager.evaluation import evaluate_seeds
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.side_effects import kept_buffers
from tests.manager.evaluation_helpers import Scale, _scaled_seed, _stabilizing, _static_batch_slot
from tests.manager.helpers import S


class FrozenInTrainMode(nn.Module):
    """Batch norm that ``eval()`` cannot switch off, as in a kernel exported in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)

    def train(self, mode: bool = True) -> FrozenInTrainMode:
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn(x)


def test_evaluation_puts_back_the_buffers_of_a_kernel_eval_cannot_switch() -> None:
    slot, registry = _stabilizing(FrozenInTrainMode())
    bn = slot.seeds[0].kernel.bn
    before = {k: v.clone() for k, v in bn.named_buffers()}
    batches = [(torch.randn(8, 3), torch.randn(8, 6))]

    first = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]

    assert bn.training  # it did run in train mode, updating its statistics on the way
    assert all(torch.equal(v, dict(bn.named_buffers())[k]) for k, v in before.items())
    assert evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"] == first


def test_kept_buffers_puts_back_a_write_through_data_and_moves_no_version() -> None:
    """A buffer written through ``.data`` (an EMA kept by hand) moves no version: it is put
    back by its values; and putting back a written one moves its version no further."""
    module = nn.Module()
    module.register_buffer("ema", torch.ones(3))
    module.register_buffer("count", torch.zeros(()))
    with kept_buffers(module):
        module.ema.data.mul_(0.5)
        module.count.add_(1)
        written = module.count._version
    assert torch.equal(module.ema, torch.ones(3)) and module.count.item() == 0
    assert module.ema._version == 0 and module.count._version == written


def test_evaluation_between_a_forward_and_its_backward_charges_the_seed_nothing() -> None:
    """A kernel whose batch norm ``eval()`` cannot switch off writes its statistics in every
    call, and its training forward's graph saved them: measured before that backward, the
    evaluation's own writes (and its putting the values back) moved their versions, the seed's
    guarded backward raised, and each step charged the seed a fault until quarantine. The
    kernels run on copies of their buffers now."""
    slot, registry = _stabilizing(FrozenInTrainMode())
    seed = slot.seeds[0]
    for _ in range(3):
        x = torch.randn(8, 3)
        out = registry.model(x)
        evaluate_seeds(registry, [(torch.randn(8, 3), torch.randn(8, 6))], F.mse_loss)
        out.pow(2).sum().backward()
        assert seed.faults == 0 and not seed.fault_log
        assert all(p.grad is not None for p in seed.seed_parameters())
        slot.zero_grad(set_to_none=True)
    assert seed.stage == S.STABILIZATION


def test_pending_teacher_logits_wait_out_an_evaluation_as_they_were_set() -> None:
    """Teacher logits set for the next training forward are set aside while measured (a no-grad
    forward that meets them reads as a reentrant checkpoint's first run, and marks the slot so)
    and are pending again after, the same tensor, also when the measurement raises."""
    model, registry, slot = _static_batch_slot(2.0)
    teacher = torch.randn(4, 6)
    slot.set_teacher_logits(teacher)
    batch = [(torch.randn(4, 3), torch.zeros(4, 6))]
    evaluate_seeds(registry, batch, F.mse_loss)
    assert slot._teacher_logits is teacher and not slot._graph.reentrant

    def failing(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        evaluate_seeds(registry, batch, failing)
    assert slot._teacher_logits is teacher and not slot._graph.reentrant


def test_evaluation_puts_modes_back_through_train() -> None:
    """A layer whose ``train`` does work (LoRA merging its update for eval): the modes were put
    back by writing the flags, so it stayed merged in training, its factors without gradient."""

    class Merging(nn.Linear):
        def __init__(self) -> None:
            super().__init__(3, 6)
            self.merged = False

        def train(self, mode: bool = True) -> Merging:
            super().train(mode)
            self.merged = not mode
            return self

    torch.manual_seed(0)
    model = nn.Sequential(Merging(), KasminaLayer(nn.Linear(6, 6), 3, 2, layer_id="slot"))
    registry = SlotRegistry(model, [model[1]])
    _scaled_seed(model[1], 1.0)
    model(torch.randn(4, 3))
    model[1].eval()  # a module the user left in eval mode stays so
    evaluate_seeds(registry, [(torch.randn(4, 3), torch.randn(4, 6))], F.mse_loss)
    assert model.training and model[0].training and not model[0].merged
    assert not model[1].training


def test_each_ablation_draws_what_the_measured_forward_drew() -> None:
    """A host that samples in eval mode (a VAE's noise): the forwards with and without the
    seed drew other numbers, and an identity seed got a benefit from the noise alone."""

    class Sampling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = KasminaLayer(nn.Linear(3, 6), 3, 2, layer_id="enc")
            self.dec = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.enc(x)
            return self.dec(h + 0.5 * torch.randn_like(h))

    torch.manual_seed(0)
    model = Sampling()
    registry = SlotRegistry(model, [model.enc])
    _scaled_seed(model.enc, 1.0)  # exactly the host's values
    model(torch.randn(4, 3))
    batches = [(torch.randn(4, 3), torch.randn(4, 3)) for _ in range(3)]
    rng = torch.get_rng_state()
    evaluation = evaluate_seeds(registry, batches, F.mse_loss)["enc[0]"]
    assert evaluation.loss_with == evaluation.loss_without and evaluation.benefit == 0.0
    assert torch.equal(torch.get_rng_state(), rng)  # the global stream as it was


def test_a_scripted_kernel_is_evaluated_and_no_hook_is_left_behind() -> None:
    """The sit-out watch hooks each seed's kernel: a scripted one refuses forward hooks, and
    the hooks already put on the others were never removed (one more each evaluation, and
    the model no longer pickled). A scripted kernel is measured as before."""
    import io

    model, registry, slot = _static_batch_slot(2.0)
    other = slot.seeds[1]
    other.attach_kernel(torch.jit.script(Scale(0.5)))
    for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
        other.transition_to(stage)
    batch = [(torch.randn(4, 3), torch.zeros(4, 6))]
    for _ in range(3):
        got = evaluate_seeds(registry, batch, F.mse_loss)
        assert set(got) == {"fc[0]", "fc[1]"}
        assert got["fc[1]"].faults == 0 and got["fc[1]"].samples == 4  # its slot ran: measured
    assert not slot.seeds[0].kernel._forward_pre_hooks and not slot._forward_pre_hooks
    other.detach_kernel()
    torch.save(model, io.BytesIO())


# ------------------------------------------------------------------------------- loads


def test_a_load_through_the_seed_drops_its_evaluation() -> None:
    """Only a load with the seed's extra state dropped its evaluation: a weights-only load (or
    one into the seed module) kept it, and G5 passed on a measurement of weights now gone."""
    model, registry, slot = _static_batch_slot(1.0)
    seed = slot.seeds[0]
    batch = [(torch.randn(4, 3), torch.zeros(4, 6))]
    weights = {k: v for k, v in model.state_dict().items() if "extra_state" not in k}
    weights["0.seeds.0.kernel.factor"] = torch.tensor(-50.0)
    for load in (
        lambda: model.load_state_dict(weights, strict=False),
        lambda: seed.load_state_dict({"kernel.factor": torch.tensor(-50.0)}, strict=False),
    ):
        evaluate_seeds(registry, batch, F.mse_loss)
        assert seed.evaluation is not None
        load()
        assert seed.evaluation is None
        assert not seed.evaluate_gate(S.ACTIVE, performance_gate=0.0).passed


def test_a_refused_load_straight_into_a_seed_changes_nothing() -> None:
    """A load into the seed module itself, which no slot's check sees, wrote its ``alpha``
    before its extra state was refused, and dropped its evaluation. Checked first now."""
    model, registry, slot = _static_batch_slot(1.0)
    seed = slot.seeds[0]
    evaluate_seeds(registry, [(torch.randn(4, 3), torch.zeros(4, 6))], F.mse_loss)
    evaluation, alpha = seed.evaluation, seed.alpha.clone()
    bad = dict(seed.state_dict())
    bad["alpha"] = torch.tensor(0.123)
    bad["_extra_state"] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    with pytest.raises(ValueError, match="extra state"):
        seed.load_state_dict(bad)
    assert seed.evaluation is evaluation and torch.equal(seed.alpha, alpha)
