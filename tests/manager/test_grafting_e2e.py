"""A small host trains on CPU while two seeds go DORMANT -> ... -> ACTIVE through the gates.

Run once on the torch reference path and once with every fused op (alpha blend, KD loss,
lifecycle update/tick) on its Triton kernel under the interpreter. At every stage the host's
gradients are checked against what docs/design.md §4 promises.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.kd.config import KDConfig
from kasmina.seeds.gates import SeedEvaluation
from kasmina.seeds.inject import attach, collect_kd_losses, detach
from kasmina.stages import SeedStage

S = SeedStage
STEPS = 3  # per epoch
GRAFT_EPOCHS = 2


class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)  # the slot: two seeds over two logits each

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch) -> str:
    monkeypatch.setenv("KASMINA_BACKEND", request.param)
    return request.param


def host_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n.replace(".host.", "."): p.grad for n, p in model.named_parameters() if ".seeds." not in n
    }


def seed_grads(slot) -> list[torch.Tensor | None]:
    return [p.grad for seed in slot.seeds for p in seed.seed_parameters()]


def measure(model: nn.Module, slot, k: int, x: torch.Tensor, y: torch.Tensor) -> SeedEvaluation:
    """Seed ``k``'s benefit: the loss as is, and with its chunk replaced by the host's."""
    c = slot.chunk_size

    def ablate(_module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[..., k * c : (k + 1) * c] = slot.host(*args)[..., k * c : (k + 1) * c]
        return out

    with torch.no_grad():
        with_seed = F.cross_entropy(model(x), y).item()
        handle = slot.register_forward_hook(ablate)
        try:
            without = F.cross_entropy(model(x), y).item()
        finally:
            handle.remove()
    seed = slot.seed(k)
    return SeedEvaluation(seed.seed_id, seed.stage, seed.alpha_value, with_seed, without)


def bare_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same step on a seedless copy of the host (same parameters)."""
    bare = copy.deepcopy(model)
    detach(bare)
    bare.zero_grad(set_to_none=True)
    F.cross_entropy(bare(x), y).backward()
    return {n: p.grad for n, p in bare.named_parameters()}


def active_grads(model: nn.Module, slot, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Reference for ACTIVE: the host with each chunk of ``out`` replaced by its seed's kernel."""
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    layer = ref.out
    h = layer.host(torch.relu(ref.mid(torch.relu(ref.inp(x)))))
    chunks = h.split(slot.chunk_size, dim=-1)
    logits = torch.cat([seed.kernel(c) for seed, c in zip(layer.seeds, chunks, strict=True)], -1)
    F.cross_entropy(logits, y).backward()
    return host_grads(ref)


def check_step(stage, model, slot, x, y, teacher) -> None:
    """One step's gradient contract for the stage both seeds are in."""
    model.zero_grad(set_to_none=True)
    slot.set_teacher_logits(teacher)
    logits = model(x)
    kd = collect_kd_losses(model)
    if stage in (S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION):
        assert kd is not None
        kd.backward(retain_graph=True)  # a KD-only backward: the host gets nothing
        assert all(g is None or not g.any() for g in host_grads(model).values()), stage
        assert all(g is not None and g.abs().sum() > 0 for g in seed_grads(slot)), stage
        model.zero_grad(set_to_none=True)
    else:
        assert kd is None, stage
    F.cross_entropy(logits, y).backward()
    grads = host_grads(model)
    if stage in (S.DORMANT, S.ISOLATED_INIT, S.COMPATIBILITY_CHECK):
        expected = bare_grads(model, x, y)  # bit-identical to the step without seeds
        assert all(torch.equal(grads[n], g) for n, g in expected.items()), stage
    elif stage in (S.GRAFTING, S.STABILIZATION):
        assert all(g is None for g in grads.values()), stage  # nothing through the slot
    else:
        expected = active_grads(model, slot, x, y)
        for name, g in expected.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6)
    trains = stage in (S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION, S.ACTIVE)
    assert all((g is not None and g.abs().sum() > 0) == trains for g in seed_grads(slot)), stage


def test_two_seeds_through_the_whole_lifecycle(backend) -> None:
    torch.manual_seed(1)
    x = torch.randn(32, 6)
    teacher_net = nn.Linear(6, 4)
    with torch.no_grad():
        teacher = teacher_net(x)
    y = teacher.argmax(-1)
    model = Host()
    slot = attach(model, "out", seeds_per_layer=2, chunk_size=2, kd_config=KDConfig(2.0))[0]
    table = slot.state_table
    host_params = [p for n, p in model.named_parameters() if ".seeds." not in n]
    host_opt = torch.optim.SGD(host_params, lr=0.2)
    seed_opt: torch.optim.Optimizer | None = None
    with torch.no_grad():
        first_loss = F.cross_entropy(model(x), y).item()

    visited = []
    total_graft_steps = GRAFT_EPOCHS * STEPS
    for _epoch in range(12):
        stage = slot.seed(0).stage
        assert slot.stages() == [stage, stage]
        visited.append(stage)
        for step in range(STEPS):
            if step == STEPS - 1:  # (GRAFTING's alpha is 0 at its first step)
                check_step(stage, model, slot, x, y, teacher)
            host_opt.zero_grad(set_to_none=True)
            if seed_opt is not None:
                seed_opt.zero_grad(set_to_none=True)
            slot.set_teacher_logits(teacher)
            loss = F.cross_entropy(model(x), y)
            kd = collect_kd_losses(model)
            (loss if kd is None else loss + 0.5 * kd).backward()
            host_opt.step()
            if seed_opt is not None and stage is not S.ACTIVE:
                seed_opt.step()
            if stage is S.GRAFTING:
                graft_step = slot.seed(0).epochs_in_stage * STEPS + step + 1
                slot.update_alpha_blending(graft_step, total_graft_steps, total_graft_steps / 16)
        if stage is S.ISOLATED_INIT and seed_opt is not None:  # the seeds trained this epoch
            for seed in slot.seeds:  # (a manager counts them for G2; here the trainer does)
                seed.trained_epochs += 1
        table.tick()
        assert slot.poll_nonfinite() == []
        if stage is S.ACTIVE:
            break
        for k, seed in enumerate(slot.seeds):
            if stage is S.DORMANT:
                assert not seed.advance().passed  # G1: no kernel yet
                torch.manual_seed(10 + k)
                seed.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2)))
            if stage is S.STABILIZATION:
                seed.performance_gate = 0.5
                assert not seed.advance().passed  # G5 refuses a seed never evaluated
                seed.record_evaluation(SeedEvaluation(seed.seed_id, stage, 1.0, 2.0, 1.0))
                assert not seed.advance().passed  # ... and one measured to do harm
                seed.record_evaluation(measure(model, slot, k, x, y))
            epochs, alpha = seed.trained_epochs, seed.alpha_value
            result = seed.advance(min_isolated_epochs=2, latency_budget_ms=1e4)
            if stage is S.ISOLATED_INIT and epochs < 2:
                assert not result.passed and result.gate == 2
            elif stage is S.GRAFTING and alpha < 0.9995:
                assert not result.passed and result.gate == 4
            else:
                assert result.passed, (stage, result)
        if stage is S.DORMANT:
            seed_opt = torch.optim.SGD([p for s in slot.seeds for p in s.seed_parameters()], lr=0.2)
        if slot.seed(0).stage is S.ACTIVE and stage is S.STABILIZATION:
            host_opt.add_param_group(
                {"params": [p for s in slot.seeds for p in s.seed_parameters()]}
            )

    assert visited == [
        S.DORMANT,
        S.ISOLATED_INIT,
        S.ISOLATED_INIT,
        S.COMPATIBILITY_CHECK,
        S.GRAFTING,
        S.GRAFTING,
        S.STABILIZATION,
        S.ACTIVE,
    ]
    assert table.illegal_transitions == 0
    assert [table.read_row(i)["LAST_GATE"] for i in range(2)] == [5, 5]
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < first_loss
