"""A kernel whose backward raises: the backward guard contains it.

The raise is one fault per forward, however many backwards run through it; the host's backward
and step complete, and only that seed loses its gradient: the other seeds of its layer, and a
kernel two seeds share, get exactly their unguarded gradients. A healthy kernel gets the same
gradient through the guard; without it (``guard_backward = False``) the error is the host's. The
guard takes the autograd engine's direct entry, probed once, wherever it is first asked.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from kasmina.utils import autograd_nodes
from tests.seeds.fault_helpers import (
    BATCH,
    C,
    Net,
    RaisesInBackward,
    assert_host_trained,
    fault_events,
    four_stage_layer,
    make_seed,
    reporting_table,
    train_step,
)
from tests.seeds.helpers import walk

S = SeedStage


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


# --------------------------------------------------------------- the engine entry point


def test_the_guard_takes_the_direct_engine_entry_even_when_first_asked_inside_a_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine entry point is probed once, on first use, which is inside the host's
    backward where grad mode is off: the probe must still find the entry (it once cached
    "unavailable" there, and every guarded backward took the slower public path)."""
    monkeypatch.setattr(autograd_nodes, "_ENGINE", [])
    public = []
    monkeypatch.setattr(
        autograd_nodes.torch.autograd,
        "grad",
        lambda *a, **k: public.append(1) or _public_grad(*a, **k),
    )
    torch.manual_seed(19)
    seed = make_seed(nn.Linear(C, C), SeedStage.GRAFTING)
    seed(torch.randn(BATCH, C, requires_grad=True)).pow(2).sum().backward()
    assert autograd_nodes._ENGINE[0] is not None
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
    monkeypatch.setattr(autograd_nodes, "_ENGINE", [])
    if how == "context":
        with torch.device("meta"):
            entry = autograd_nodes._direct_engine()
    else:
        torch.set_default_device("meta")
        try:
            entry = autograd_nodes._direct_engine()
        finally:
            torch.set_default_device(None)  # none set, as before (a "cpu" one is a mode left on)
    assert entry is not None and autograd_nodes._ENGINE == [entry]


_public_grad = torch.autograd.grad


@pytest.mark.parametrize("where", ["seed", "layer"])
@pytest.mark.parametrize(
    "stage", [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION], ids=lambda s: s.name
)
def test_a_host_activation_written_in_place_after_the_seed_ran_is_no_fault(
    stage: SeedStage, where: str
) -> None:
    """The slot's host returns a view of its own input (an ``nn.Identity`` hook point), and the
    model writes into that input after the slot ran: the kernels' graphs saved it, so their
    backward fails autograd's version check. That is the model's doing, as a weight changed in
    place is the caller's: no fault is charged (three quarantined healthy seeds), the host's
    backward completes, and the seeds' gradient from that graph is dropped."""
    torch.manual_seed(0)
    up = nn.Linear(4, C if where == "seed" else 2 * C)
    if where == "seed":
        seeds = [make_seed(nn.Sequential(nn.Linear(C, C), nn.Tanh()), stage)]
        slot: nn.Module = seeds[0]
    else:  # every seed blending (GuardedBlend's island), else ContainedBackward's
        slot = KasminaLayer(nn.Identity(), 2, C)
        seeds = list(slot.seeds)
        for seed in seeds:
            seed.attach_kernel(nn.Sequential(nn.Linear(C, C), nn.Tanh()))
            walk(seed, stage)
    h = up(torch.randn(BATCH, 4))
    loss = slot(h).pow(2).sum()
    h.mul_(2.0)  # into the activation the kernels saved (``Identity`` returned it)
    loss.backward()
    assert [s.faults for s in seeds] == [0] * len(seeds)
    assert [s.stage for s in seeds] == [stage] * len(seeds)
    assert all(p.grad is None for s in seeds for p in s.kernel.parameters())
    if stage == S.ISOLATED_INIT:  # the straight-through incubate passes the host's gradient
        assert up.weight.grad is not None and torch.isfinite(up.weight.grad).all()


@pytest.mark.parametrize("stage", [S.GRAFTING, S.STABILIZATION], ids=lambda s: s.name)
def test_a_kernel_whose_backward_raises_is_charged_though_its_input_was_written_after(
    stage: SeedStage,
) -> None:
    """Only autograd's refusal of the stale graph is the model's doing: a kernel whose backward
    raises anything else, on an activation the model later writes in place (a ``ReLU(inplace=
    True)`` after an ``Identity`` hook point), was taken as stale too, never charged and never
    quarantined, its gradient silently dropped every step."""
    seed = make_seed(RaisesInBackward(C), stage, fault_limit=3)
    up = nn.Linear(4, C)
    for _ in range(3):
        h = up(torch.randn(BATCH, 4))
        loss = seed(h).pow(2).sum()
        h.mul_(2.0)
        loss.backward()
    assert seed.faults == 3 and seed.stage == S.QUARANTINE


class _WritesWhatItSaved(nn.Module):
    """A kernel that writes in place a tensor its own graph saved (``exp`` saves its result):
    autograd refuses its backward with the stale-graph words, though neither its weights nor
    its input changed."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).exp().mul_(0.5)


@pytest.mark.parametrize("stage", [S.GRAFTING, S.STABILIZATION], ids=lambda s: s.name)
def test_a_kernel_that_staled_its_own_graph_is_charged(stage: SeedStage) -> None:
    """The stale-graph words excuse a kernel only where its weights or its input changed after
    its forward (the model's or the caller's doing): a kernel that writes what its own graph
    saved is at fault, charged at each backward and quarantined at its limit."""
    seed = make_seed(_WritesWhatItSaved(C), stage, fault_limit=3)
    up = nn.Linear(4, C)
    for _ in range(3):
        seed(up(torch.randn(BATCH, 4))).pow(2).sum().backward()
    assert seed.faults == 3 and seed.stage == S.QUARANTINE
