"""A seed's own graph (its island) is freed by the backward that keeps no graph.

The guarded backward ran the kernels' backward retaining their graphs (a KD loss's seed-only
backward and the host's both pass through them), and nothing freed them but the outer graph: a
loop that held the loss (``history.append(loss)``, or just the loop variable until the next
step's forward) kept every step's kernel activations, and the slot's input they read, where
PyTorch frees the saved tensors of the nodes a backward runs. Now a backward that keeps no graph
frees them, but a KD loss's, whose seed-only part precedes the host's through them.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.seeds.island import contain_backward
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.helpers import walk

S = SeedStage
ISOLATED = [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION]


class SavesHidden(nn.Module):
    """``h * sigmoid(h)``, ``h = linear(x)``: its graph saves ``h``, which ``seen`` follows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.seen: list[weakref.ref[torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        self.seen.append(weakref.ref(h))
        return h * torch.sigmoid(h)


def _layer(stage: SeedStage, kd: bool = False) -> tuple[KasminaLayer, list[SavesHidden]]:
    torch.manual_seed(4)
    config = KDConfig(temperature=2.0) if kd else None
    layer = KasminaLayer(nn.Linear(3, 4), 2, 2, kd_config=config, layer_id="fc")
    kernels = [SavesHidden(2), SavesHidden(2)]
    for seed, kernel in zip(layer.seeds, kernels, strict=True):
        seed.attach_kernel(kernel)
        walk(seed, stage)
    layer.update_alpha_blending(5, 10)
    return layer, kernels


def _alive(kernels: list[SavesHidden]) -> int:
    return sum(ref() is not None for k in kernels for ref in k.seen)


def _grads(layer: KasminaLayer) -> list[torch.Tensor]:
    return [p.grad.clone() for s in layer.seeds for p in s.seed_parameters()]


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_backward_that_keeps_no_graph_frees_the_seeds_graphs(stage: SeedStage) -> None:
    layer, kernels = _layer(stage)
    x = torch.randn(5, 3)
    held = []
    for _ in range(3):  # the loop holds every step's loss
        loss = layer(x).square().sum()
        assert _alive(kernels) >= 2
        loss.backward()
        held.append(loss)
        assert _alive(kernels) == 0
    assert all(p.grad is not None for s in layer.seeds for p in s.seed_parameters())


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_retain_graph_keeps_them_for_the_next_backward_which_frees_them(stage: SeedStage) -> None:
    layer, kernels = _layer(stage)
    x = torch.randn(5, 3)
    loss = layer(x).square().sum()
    loss.backward(retain_graph=True)
    once = _grads(layer)
    assert _alive(kernels) == 2
    loss.backward()  # the second backward gets the seeds their gradient again
    for got, first in zip(_grads(layer), once, strict=True):
        torch.testing.assert_close(got, 2 * first, rtol=1e-6, atol=0)
    assert _alive(kernels) == 0


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_kd_backward_keeps_them_for_the_hosts_backward_after_it(stage: SeedStage) -> None:
    """``kd.backward()`` then ``loss.backward()`` (each without ``retain_graph``): the host's
    backward still trains the seeds through their graphs, and frees them."""
    layer, kernels = _layer(stage, kd=True)
    x, teacher = torch.randn(5, 3), torch.randn(5, 4)
    out = layer(x, teacher_logits=teacher)
    kd = layer.get_and_clear_kd_losses()
    assert kd is not None
    kd.backward()
    after_kd = _grads(layer)
    assert _alive(kernels) == 2
    out.square().sum().backward()
    assert all(not torch.equal(a, b) for a, b in zip(_grads(layer), after_kd, strict=True))
    assert _alive(kernels) == 0


def test_a_backward_through_freed_graphs_raises_as_pytorch_does() -> None:
    """Past the node that stands for them nothing on the host's side saved a tensor, so
    PyTorch's own check lets a second backward through: the seeds' graphs raise its error, as
    the kernel's own nodes would without the guard, and no fault is charged."""
    kernel = SavesHidden(2)
    faults: list[tuple[str, str]] = []

    class Seed:
        finite_flag = torch.tensor(True)

        def record_fault(self, kind: str, reason: str) -> None:
            faults.append((kind, reason))

    out = kernel(torch.randn(4, 2))
    (guarded,) = contain_backward([out], [list(kernel.parameters())], [Seed()])
    guarded.sum().backward()
    first = [p.grad.clone() for p in kernel.parameters()]
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        guarded.sum().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(kernel.parameters(), first, strict=True))
    assert not faults


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_the_hosts_backward_then_the_kd_losss_raises_without_retain_graph(
    stage: SeedStage,
) -> None:
    """The other order, ``loss.backward()`` then ``kd.backward()``: the first kept no graph,
    so the second raises PyTorch's error, as it would through the kernels' own graphs, where
    it silently gave the seeds no KD gradient; ``retain_graph=True`` on the first trains them."""
    x, teacher = torch.randn(5, 3), torch.randn(5, 4)
    for retain in (True, False):
        layer, kernels = _layer(stage, kd=True)
        out = layer(x, teacher_logits=teacher)
        kd = layer.get_and_clear_kd_losses()
        assert kd is not None
        out.square().sum().backward(retain_graph=retain)
        if retain:
            before = _grads(layer)
            kd.backward()
            assert all(not torch.equal(a, b) for a, b in zip(_grads(layer), before, strict=True))
        else:
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                kd.backward()


def test_create_graph_keeps_them_for_the_gradients_own_backward() -> None:
    """``create_graph=True, retain_graph=False``: the engine reports a graph not kept, but the
    gradient's own graph runs back through the seeds' (a gradient penalty): freed there, the
    double backward lost its second-order term through them, silently. (A blending slot's node
    saves tensors of its own: there PyTorch refuses the double backward without
    ``retain_graph``, as it always did.)"""
    x = torch.randn(5, 3)
    grads = []
    for retain in (True, False):
        layer, _ = _layer(S.ISOLATED_INIT)
        params = [p for s in layer.seeds for p in s.seed_parameters()]
        loss = layer(x).pow(3).sum()
        first = torch.autograd.grad(loss, params, create_graph=True, retain_graph=retain)
        sum(g.square().sum() for g in first).backward()
        grads.append(_grads(layer))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
