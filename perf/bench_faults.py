"""What fault containment costs the host's training step (CPU reference path, one core).

Every call into a seed's kernel is guarded (``kasmina.seeds.seed``) in two halves: on the host, a
``try`` around the call and a metadata check of the output (type, shape, dtype, device); on the
device, the non-finite fallback (a finite test, a flag, the alpha masked by the test). The guard
must be cheap enough to leave on always, so it is measured where a seed spends its training: a
full step (forward, backward, SGD step) of a small host whose ``KasminaLayer`` has every seed in
GRAFTING. There the layer runs the device half, the blend and the backward guard as one
autograd node (``kasmina.seeds.island.GuardedBlend``).

Peers, built from copies of the same host and kernels and checked to give the same values:

- **unguarded**: a hand-written slot that runs the kernels on the detached chunks and the same
  ``kasmina.ops.alpha_blend`` with a per-chunk alpha, and nothing else (the target's peer);
- **device half only**: the hand-written slot plus the seeds' own device-side check, ``where``
  and alpha mask (no ``try``, no output check, none of the layer's bookkeeping), built on every
  step as a GPU builds them: on the CPU the layer reads its chunk sums on the host instead and
  skips the masks while every chunk is finite (``faults.finite_test``);
- **no host guard**: the same ``KasminaLayer`` with the host half of the guard taken out of each
  seed (the ``try``, the output check and the backward guard), which also puts the layer on its
  per-op path (the one node needs the backward guard);
- **no backward guard**: the same ``KasminaLayer`` with ``guard_backward`` off
  (``KasminaConfig.guard_seed_backward=False``): the forward guard alone, on the per-op path.

Target: guarded step <= 1.02x the unguarded peer. All five run in interleaved rounds (order
rotated every round) so that a shared machine's drift hits them alike; a ratio is the ratio of
two medians. Speeds are reported, never asserted.
"""

from __future__ import annotations

import copy
import statistics
import timeit
import types
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kasmina.ops import alpha_blend
from kasmina.seeds.faults import finite_chunks, output_fault
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage

SEEDS = 4
# (features, batch): the host of perf/bench_seeds.py, and a wider one where each op does more
# work, so that the fixed per-op cost of the guard weighs less.
SIZES = {"small": (256, 32), "wide": (1024, 256)}
GRAFTING_PATH = (SeedStage.ISOLATED_INIT, SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING)
TARGET = "fault containment: GRAFTING step <= 1.02x an unguarded peer (same math, same run)"


@pytest.fixture(autouse=True)
def reference_cpu(monkeypatch: pytest.MonkeyPatch):
    """One core and the reference backend: the CPU path every CPU tensor takes."""
    monkeypatch.setenv("KASMINA_BACKEND", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Net(nn.Module):
    """input layer -> slot -> head: the slot's host gets a gradient from upstream and below."""

    def __init__(self, slot: nn.Module, features: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(features, features)
        self.slot = slot
        self.head = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.slot(torch.relu(self.inp(x)))))


class HandWrittenSlot(nn.Module):
    """KasminaLayer's GRAFTING math written out: kernels on detached chunks, one blend.

    ``device_half`` adds the layer's device-side guard as ``KasminaLayer._graft`` does it for
    a layer of GRAFTING seeds: one finiteness reduction over the concatenated outputs
    (``finite_chunks``), one flag update, one ``where`` and the alpha mask.
    """

    def __init__(self, layer: KasminaLayer, device_half: bool = False) -> None:
        super().__init__()
        layer = copy.deepcopy(layer)
        self.host = layer.host
        self.seeds = layer.seeds
        self.chunk = layer.chunk_size
        self.register_buffer("flags", torch.ones(len(layer.seeds), dtype=torch.bool))
        self.device_half = device_half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.host(x)
        chunks = h.split(self.chunk, dim=-1)
        outs = [seed.kernel(c.detach()) for seed, c in zip(self.seeds, chunks, strict=True)]
        seed_full = torch.cat(outs, dim=-1)
        alphas = torch.stack([seed.alpha for seed in self.seeds])
        if self.device_half:
            chunked = seed_full.unflatten(-1, (len(self.seeds), -1))
            ok = finite_chunks(chunked)
            self.flags.logical_and_(ok)
            host = h.detach().unflatten(-1, (len(self.seeds), -1))
            seed_full = torch.where(ok.unsqueeze(-1), chunked, host).flatten(-2)
            alphas = alphas.mul(ok)
        return alpha_blend(seed_full, h, alphas, mode="blend")


def _call_kernel_without_host_guard(
    seed: GradientIsolatedSeed, x: torch.Tensor, stage: SeedStage
) -> tuple[torch.Tensor, torch.Tensor]:
    """``GradientIsolatedSeed._call_kernel`` without its host half (``try``, output check)."""
    xin = x.view_as(x) if stage == SeedStage.ACTIVE else x.detach()
    return seed.kernel(xin), xin


def _without_host_guard(layer: KasminaLayer) -> KasminaLayer:
    """The layer without the host half of the guard and without the backward guard."""
    layer = copy.deepcopy(layer)
    for seed in layer.seeds:
        seed._call_kernel = types.MethodType(_call_kernel_without_host_guard, seed)
        seed.guard_backward = False
    return layer


def _without_backward_guard(layer: KasminaLayer) -> KasminaLayer:
    """The guarded layer with ``guard_backward`` off (``KasminaConfig.guard_seed_backward``)."""
    layer = copy.deepcopy(layer)
    for seed in layer.seeds:
        seed.guard_backward = False
    return layer


def _grafting_layer(features: int) -> KasminaLayer:
    torch.manual_seed(1)
    chunk = features // SEEDS
    layer = KasminaLayer(nn.Linear(features, features), SEEDS, chunk)
    for seed in layer.seeds:
        seed.attach_kernel(nn.Sequential(nn.Linear(chunk, chunk), nn.Tanh()))
        for stage in GRAFTING_PATH:
            seed.transition_to(stage)
    layer.update_alpha_blending(4, 10)
    return layer


def _models(size: str) -> tuple[dict[str, Net], torch.Tensor]:
    """The guarded net and its four peers (independent copies), and one batch."""
    features, batch = SIZES[size]
    layer = _grafting_layer(features)
    nets = {
        "unguarded": Net(HandWrittenSlot(layer), features),
        "device_half_only": Net(HandWrittenSlot(layer, device_half=True), features),
        "no_host_guard": Net(_without_host_guard(layer), features),
        "no_backward_guard": Net(_without_backward_guard(layer), features),
        "guarded": Net(layer, features),
    }
    x = torch.randn(batch, features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the same math: every peer gives the guarded values exactly
        expected = nets["guarded"](x)
        for name, net in nets.items():
            assert torch.equal(net(x), expected), name
    return nets, x


def _trainer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One training step of ``model`` on ``x``: zero grads, forward, backward, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


def _interleaved(
    steps: dict[str, Callable[[], None]], number: int, rounds: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum seconds per call of each step, timed in rounds whose order rotates
    every round. On a shared machine the minimum is the least disturbed sample of each."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timeit.timeit(steps[name], number=number) / number)
    return (
        {name: statistics.median(ts) for name, ts in times.items()},
        {name: min(ts) for name, ts in times.items()},
    )


@pytest.mark.parametrize("size", list(SIZES))
def test_unguarded_peer_step(benchmark, size: str) -> None:
    nets, x = _models(size)
    benchmark(_trainer(nets["unguarded"], x))
    benchmark.extra_info["target"] = "peer for test_guarded_grafting_step (no guard at all)"


@pytest.mark.parametrize("size", list(SIZES))
def test_guarded_grafting_step(benchmark, size: str, smoke: bool) -> None:
    nets, x = _models(size)
    steps = {name: _trainer(net, x) for name, net in nets.items()}
    benchmark(steps["guarded"])
    number, rounds = (20, 61) if size == "small" else (4, 31)
    number, rounds = (1, 3) if smoke else (number, rounds)
    median, fastest = _interleaved(steps, number, rounds)
    peers = [name for name in steps if name != "guarded"]
    ratio = {name: median["guarded"] / median[name] for name in peers}
    ratio_min = {name: fastest["guarded"] / fastest[name] for name in peers}
    benchmark.extra_info.update(
        {
            "target": (
                f"{TARGET}: {ratio['unguarded']:.3f}x (min {ratio_min['unguarded']:.3f}x); "
                f"over the device half only {ratio['device_half_only']:.3f}x "
                f"(min {ratio_min['device_half_only']:.3f}x); over the layer without the host "
                f"guard {ratio['no_host_guard']:.3f}x (min {ratio_min['no_host_guard']:.3f}x); "
                f"the forward guard alone (guard_seed_backward=False) over the unguarded peer "
                f"{median['no_backward_guard'] / median['unguarded']:.3f}x "
                f"(min {fastest['no_backward_guard'] / fastest['unguarded']:.3f}x)"
            ),
            **{f"{name}_median_us": round(t * 1e6, 2) for name, t in median.items()},
            **{f"{name}_min_us": round(t * 1e6, 2) for name, t in fastest.items()},
            **{f"ratio_vs_{name}": round(r, 4) for name, r in ratio.items()},
            **{f"min_ratio_vs_{name}": round(r, 4) for name, r in ratio_min.items()},
        }
    )


def test_host_guard_per_call(benchmark) -> None:
    """The host half alone (the output check; a ``try`` costs nothing until it catches), per
    seed call, and what it adds to the small host's step: steps are too noisy on a shared
    machine to resolve a few microseconds, so the share is computed from this measurement."""
    layer = _grafting_layer(SIZES["small"][0])
    x = torch.randn(SIZES["small"][1], layer.num_seeds * layer.chunk_size)
    chunk = x.split(layer.chunk_size, dim=-1)[0]
    out = layer.seed(0).kernel(chunk.detach())
    assert benchmark(output_fault, out, chunk) is None
    nets, batch = _models("small")
    step = _trainer(nets["no_host_guard"], batch)
    step_s = min(timeit.repeat(step, number=20, repeat=15)) / 20
    share = SEEDS * benchmark.stats.stats.median / step_s
    benchmark.extra_info["target"] = (
        f"host half of the guard, per seed call: x {SEEDS} seeds = {share:.2%} of the small "
        f"host's step ({step_s * 1e6:.0f} us, the layer without it)"
    )
