"""Cost of seeds over the bare host layer, and of lifecycle ticks/updates (docs/design.md §8).

Targets: a DORMANT seed adds <= 10 us to a host layer's forward (CPU, one core); a 1,024-seed
lifecycle update runs in one launch. The bare layer is measured in this file (``test_bare_*``)
and again inside each seed benchmark so that ``extra_info`` carries the overhead and the ratio.
"""

from __future__ import annotations

import timeit

import pytest
import torch
from paired import paired  # perf/ is on sys.path under pytest
from torch import nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import SeedStage

FEATURES, SEEDS, BATCH = 256, 4, 32
CHUNK = FEATURES // SEEDS
DORMANT_TARGET = "DORMANT seed overhead <= 10 us over the bare layer"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _Identity(nn.Module):
    out_features = FEATURES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _host() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, FEATURES)


def _record_overhead(benchmark, ours, bare, target: str, smoke: bool = False) -> None:
    """The slot's overhead over the bare layer from one paired run (``perf/paired.py``: batches
    of each back to back, the order alternating), not from two timings taken apart: the
    difference of two unpaired medians on a shared machine swung by more than the overhead."""
    rounds, number = (3, 5) if smoke else (21, 200)  # smoke: ``perf/conftest.smoke``
    seed_s, bare_s, ratio = paired(ours, bare, rounds=rounds, number=number)
    benchmark.extra_info.update(
        {
            "target": target,
            "bare_median_us": round(bare_s * 1e6, 3),
            "slot_median_us": round(seed_s * 1e6, 3),
            "overhead_us": round((seed_s - bare_s) * 1e6, 3),
            "ratio": round(ratio, 3),
        }
    )


def test_bare_host_layer(benchmark) -> None:
    host, x = _host(), torch.randn(BATCH, FEATURES)
    benchmark(host, x)
    benchmark.extra_info["target"] = "reference for the seed overheads below"


def test_dormant_seed_layer(benchmark, smoke: bool) -> None:
    host, x = _host(), torch.randn(BATCH, FEATURES)
    layer = KasminaLayer(host, SEEDS, CHUNK)
    for k in range(SEEDS):
        layer.seed(k).attach_kernel(nn.Linear(CHUNK, CHUNK))
    benchmark(layer, x)
    _record_overhead(benchmark, lambda: layer(x), lambda: host(x), DORMANT_TARGET, smoke)
    # The same wrapper around an identity host: the overhead without the Linear's noise.
    identity = _Identity()
    wrapped = KasminaLayer(identity, SEEDS, CHUNK)
    bare_s = min(timeit.repeat(lambda: identity(x), number=2000, repeat=9)) / 2000
    slot_s = min(timeit.repeat(lambda: wrapped(x), number=2000, repeat=9)) / 2000
    benchmark.extra_info["identity_host_overhead_us"] = round((slot_s - bare_s) * 1e6, 3)


def test_grafting_seed_layer(benchmark, smoke: bool) -> None:
    host, x = _host(), torch.randn(BATCH, FEATURES)
    layer = KasminaLayer(host, SEEDS, CHUNK)
    seed = layer.seed(0)
    seed.attach_kernel(nn.Linear(CHUNK, CHUNK))
    for stage in (SeedStage.ISOLATED_INIT, SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING):
        seed.transition_to(stage)
    seed.update_alpha_blending(5, 10)
    benchmark(layer, x)
    what = "GRAFTING: one seed's kernel + one blend (no §8 number)"
    _record_overhead(benchmark, lambda: layer(x), lambda: host(x), what, smoke)


def test_grafting_seed_forward_backward(benchmark, smoke: bool) -> None:
    host, x = _host(), torch.randn(BATCH, FEATURES)
    layer = KasminaLayer(host, SEEDS, CHUNK)
    seed = layer.seed(0)
    seed.attach_kernel(nn.Linear(CHUNK, CHUNK))
    for stage in (SeedStage.ISOLATED_INIT, SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING):
        seed.transition_to(stage)
    seed.update_alpha_blending(5, 10)

    def step(module: nn.Module) -> None:
        module(x).sum().backward()

    benchmark(step, layer)
    what = "GRAFTING forward+backward (no §8 number)"
    _record_overhead(benchmark, lambda: step(layer), lambda: step(host), what, smoke)


def test_lifecycle_tick_1024(benchmark) -> None:
    table = GPUStateTensor(1024, "cpu")
    benchmark(table.tick)
    benchmark.extra_info["target"] = "1,024-seed tick in one launch (GPU: perf/bench_gpu.py)"


def test_lifecycle_batch_update_1024(benchmark) -> None:
    table = GPUStateTensor(1024, "cpu")
    forward = [(i, SeedStage.ISOLATED_INIT) for i in range(1024)]
    back = [(i, SeedStage.HARVESTING) for i in range(1024)]
    cycle = [SeedStage.COOLDOWN, SeedStage.RECYCLING, SeedStage.DORMANT]

    def reset() -> None:
        table.batch_state_update(back)
        for stage in cycle:
            table.batch_state_update([(i, stage) for i in range(1024)])

    def run() -> None:
        codes = table.batch_state_update(forward)
        assert all(c == 0 for c in codes)

    run()  # every round starts from ISOLATED_INIT and is walked back to DORMANT by ``reset``
    benchmark.pedantic(run, setup=reset, rounds=20, iterations=1)
    benchmark.extra_info["target"] = "1,024 transitions in one launch + one read-back of codes"
