"""The guard's finite test, and what it costs.

On the CPU the guard reads its finiteness sums on the host (a load, not a sync) and builds no
mask while every chunk is finite: on the one-node path, on the layer's per-op path and for a
stand-alone seed. Each of those is checked against the device-side test (the path a GPU takes)
bit for bit, and ``torch.jit.trace`` must keep the device-side test. The test is one sum per
chunk, which only an absurd output overflows; the masks of the seeds that did not run are cached,
bounded and safe across threads; and a training step through guarded seeds never syncs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina.seeds import faults
from kasmina.seeds.faults import all_finite, finite_chunks
from kasmina.seeds.masks import MAX_PATTERNS, ChunkMasks
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage
from tests.profiling import DispatchedOps, syncs_inside
from tests.seeds.blend_helpers import _layer, _nodes, _Poison, _run
from tests.seeds.fault_helpers import BATCH, RUNNING, C, four_stage_layer, make_seed

S = SeedStage


def test_finite_cpu_chunks_skip_the_masks() -> None:
    """On the CPU the node reads the chunk sums (a load, not a sync): with every chunk finite
    it runs no finite test, flag update, alpha mask, zeroing or backward ``where``; a
    non-finite chunk still takes the masked path and clears its flag."""
    layer = _layer([S.GRAFTING] * 3, nn.Linear(4, 6), 2)
    x, w = torch.randn(5, 4, requires_grad=True), torch.randn(5, 6)
    with DispatchedOps() as ops:
        (layer(x) * w).sum().backward()
    assert {"eq", "logical_and_", "nan_to_num", "where"}.isdisjoint(ops.names), ops.names
    assert layer._finite_flags.tolist() == [True] * 3
    poisoned = _layer([S.GRAFTING] * 3, nn.Linear(4, 6), 2, kernels={1: _Poison(2, float("inf"))})
    with DispatchedOps() as ops:
        (poisoned(x) * w).sum().backward()
    assert {"logical_and_", "nan_to_num", "where"} <= set(ops.names)
    assert poisoned._finite_flags.tolist() == [True, False, True]


@pytest.mark.parametrize("poisoned", [None, 3], ids=["finite", "ACTIVE seed NaN"])
def test_the_per_op_path_reads_the_sums_and_gives_the_device_path_values(
    poisoned: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ISOLATED_INIT, GRAFTING, STABILIZATION and ACTIVE seeds take the per-op path. On the CPU
    with every chunk finite it builds no fallback mask (one ``where``, which keeps the chunks
    that do not blend beside the GRAFTING one, and no gradient hook), and gives what the
    device-side test gives bit for bit; a non-finite chunk takes the masked path."""
    kernels = [nn.Sequential(nn.Linear(2, 2), nn.Tanh()) for _ in range(4)]
    if poisoned is not None:
        kernels[poisoned] = _Poison(2, float("nan"))
    layer, x = four_stage_layer(kernels)
    device_only = copy.deepcopy(layer)
    w = torch.randn(BATCH, 8)
    with DispatchedOps() as ops:
        got = _run(layer, x, w)
    assert "GuardedBlendBackward" not in _nodes(got[-1])
    assert (ops.names.count("where") > 3) == (poisoned is not None)  # one, and its backward
    monkeypatch.setattr(faults, "_read_all_finite", lambda sums: False)
    want = _run(device_only, x, w)
    for a, b in zip(got[:2], want[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[2].keys() == want[2].keys()
    for name in got[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=0, atol=0)
    assert got[3].tolist() == want[3].tolist() == [k != poisoned for k in range(4)]


@pytest.mark.parametrize("stage", RUNNING, ids=[s.name for s in RUNNING])
@pytest.mark.parametrize("poison", [None, float("nan")], ids=["finite", "NaN"])
def test_a_stand_alone_seed_reads_its_sum_and_gives_the_device_path_values(
    stage: SeedStage, poison: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed used outside a layer reads its one sum the same way: no mask while finite on the
    CPU, and bit for bit what the device-side test gives, in every running stage."""
    torch.manual_seed(3)
    kernel = nn.Sequential(nn.Linear(C, C), nn.Tanh()) if poison is None else _Poison(C, poison)
    seed = make_seed(kernel, stage)
    device_only = copy.deepcopy(seed)
    x, w = torch.randn(BATCH, C), torch.randn(BATCH, C)

    def run(s: GradientIsolatedSeed):
        h = x.clone().requires_grad_()
        with DispatchedOps() as ops:
            out = s(h)
            (out * w).sum().backward()
        grads = [p.grad for p in s.seed_parameters()]
        return out.detach(), h.grad, grads, bool(s.finite_flag), ops.names

    got = run(seed)
    assert ("where" in got[4]) == (poison is not None)
    monkeypatch.setattr(faults, "_read_all_finite", lambda sums: False)
    want = run(device_only)
    for a, b in zip([*got[:2], *got[2]], [*want[:2], *want[2]], strict=True):
        if a is None or b is None:
            assert a is b
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[3] == want[3] == (poison is None)


@pytest.mark.parametrize("stage", RUNNING, ids=[s.name for s in RUNNING])
def test_a_stand_alone_seed_that_falls_back_sends_its_kernel_nothing(stage: SeedStage) -> None:
    """In a slot a seed whose output is not finite gets a zero gradient in every stage; a
    stand-alone seed in ISOLATED_INIT still sent its kernel the whole gradient, so a loop that
    stepped it without polling trained it on the batch it fell back on."""
    torch.manual_seed(3)
    seed = make_seed(_Poison(C, float("nan")), stage)
    x = torch.randn(BATCH, C, requires_grad=True)
    out = seed(x)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in seed.seed_parameters())
    assert not seed.finite_flag


class _Subclass(torch.Tensor):
    pass


def test_only_plain_cpu_sums_are_read_on_the_host() -> None:
    """Reading is free only for a plain CPU tensor: another device, or a subclass whose read
    might be a collective or a trace, leaves the decision to the device-side test."""
    sums = torch.tensor([1.0, -2.0, 3e38])
    assert faults._read_all_finite(sums)
    assert not faults._read_all_finite(torch.tensor([1.0, float("nan")]))
    assert not faults._read_all_finite(torch.tensor([float("-inf"), 0.0]))
    assert not faults._read_all_finite(sums.to("meta"))
    assert not faults._read_all_finite(sums.as_subclass(_Subclass))
    assert faults._read_all_finite(torch.tensor(2.0)) and not faults._read_all_finite(
        torch.tensor(float("inf"))
    )


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_a_traced_layer_keeps_the_device_side_test() -> None:
    """``torch.jit.trace`` records the device-side test, not a value read while tracing: the
    trace, made with finite seeds, still falls back when a seed turns non-finite."""
    layer = _layer([S.GRAFTING] * 2, nn.Linear(4, 4), 2)
    x = torch.randn(3, 4)
    with torch.no_grad():
        traced = torch.jit.trace(layer, (x,), check_trace=False)
        layer.seed(1).kernel[0].weight.fill_(float("nan"))  # shared with the trace
        want = layer(x)
        got = traced(x)
    assert torch.isfinite(want).all() and torch.equal(got, want)
    assert torch.equal(want[:, 2:], layer.host(x)[:, 2:])  # seed 1 fell back to the host


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_the_finite_test_is_one_sum_that_only_an_absurd_output_overflows(
    dtype: torch.dtype,
) -> None:
    """Finite chunks pass, NaN and inf fail, and so does a chunk whose sum overflows (its mean
    magnitude is above ``finfo.max / numel``); fp16/bf16 sum in fp32, so values an fp16 sum
    would overflow on (65504) pass."""
    big = torch.finfo(dtype).max / 2
    chunks = torch.zeros(3, 5, 4, dtype=dtype)
    chunks[:, 1] = 60000 if dtype == torch.float16 else 1e4  # sums past the fp16 range
    chunks[0, 2, 0] = float("nan")
    chunks[1, 3, 2] = float("-inf")
    if dtype != torch.float16:  # fp16/bf16 sums run in fp32: only fp32/fp64 overflow here
        chunks[:, 4] = big
    got = finite_chunks(chunks).tolist()
    overflow = dtype != torch.float16
    assert got == [True, True, False, False, not overflow]
    assert bool(all_finite(chunks[:, :2])) and not bool(all_finite(chunks))


# --------------------------------------------------------------------------- the mask cache


def test_the_mask_cache_keeps_the_patterns_in_use_and_no_more() -> None:
    """A wide slot whose seeds graft and are culled in ever new sets makes a new pattern each
    time; the cache kept every one (one tensor each) for the whole run. It keeps the
    ``MAX_PATTERNS`` most recently used, and a dropped pattern is made again, equal."""
    masks = ChunkMasks()
    cpu = torch.device("cpu")
    n = 12
    kept = masks.passed(n, {0}, cpu)
    for k in range(3 * MAX_PATTERNS):
        ran = {i for i in range(n) if (k >> i) & 1}
        got = masks.passed(n, ran, cpu)
        assert got.tolist() == [i not in ran for i in range(n)]
        assert masks.passed(n, {0}, cpu) is kept  # in use: never dropped
        assert len(masks) <= MAX_PATTERNS
    assert len(masks) == MAX_PATTERNS
    assert masks.passed(n, {1}, cpu).tolist() == [i != 1 for i in range(n)]


def test_the_mask_cache_takes_a_pattern_another_thread_dropped_meanwhile() -> None:
    """Serving threads share a slot's cache: a thread switched out between its cache hit and
    marking the pattern recent, while another thread's call added a pattern and dropped that
    one, raised KeyError out of its forward. The switch is forced at that point."""
    import threading
    from collections import OrderedDict

    masks, cpu, n = ChunkMasks(), torch.device("cpu"), 8
    oldest = masks.passed(n, {0}, cpu)
    for k in range(1, MAX_PATTERNS):
        masks.passed(n, {i for i in range(n) if ((k + 1) >> i) & 1}, cpu)  # not {0}'s
    assert len(masks) == MAX_PATTERNS
    hit, go = threading.Event(), threading.Event()

    class SwitchesAfterAHit(OrderedDict):
        def get(self, key, default=None):
            value = OrderedDict.get(self, key, default)
            if threading.current_thread().name == "serving":
                hit.set()
                go.wait(10)
            return value

    masks._cache = SwitchesAfterAHit(masks._cache)
    got: list[object] = []

    def serve() -> None:
        try:
            got.append(masks.passed(n, {0}, cpu))
        except Exception as exc:  # the assertion below names it
            got.append(exc)

    thread = threading.Thread(target=serve, name="serving")
    thread.start()
    assert hit.wait(10)
    masks.passed(n, set(range(1, n)), cpu)  # a new pattern: the oldest is dropped
    go.set()
    thread.join(10)
    assert len(got) == 1 and got[0] is oldest, got
    assert len(masks) <= MAX_PATTERNS


# ------------------------------------------------------------------------------- no sync


_DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize("device", _DEVICES)
def test_the_guarded_training_step_never_syncs(device: str) -> None:
    """A full training step through a layer of guarded seeds (one of them non-finite) reads
    nothing back from the device: the profiler sees no synchronisation and no scalar read
    inside the steps (on CUDA ``set_sync_debug_mode("error")`` also turns any into an error),
    and the fault is seen at the step boundary, by the one poll."""
    torch.manual_seed(5)
    stages = [S.GRAFTING, S.GRAFTING, S.STABILIZATION]
    layer = _layer(stages, nn.Linear(8, 6), 2, kernels={1: _Poison(2, float("nan"))})
    net = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(6, 3)).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(16, 4, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        net(x).square().mean().backward()
        optimizer.step()

    step()  # warm-up: the layer's cached masks, the optimizer's state
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        torch.cuda.synchronize()
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.profiler.profile(activities=activities) as prof:
            with torch.profiler.record_function("guarded_steps"):
                for _ in range(3):
                    step()
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert syncs_inside(prof, "guarded_steps") == []
    assert layer.poll_nonfinite() == [layer.seed(1).seed_id]
    assert all(torch.isfinite(p).all() for p in net.parameters())
