"""The one-node guarded graft (``island.GuardedBlend``) against the unguarded layer path.

A layer whose running seeds all blend against the detached host (GRAFTING, STABILIZATION)
takes one autograd node for its guard's device half, the blend and the backward guard. It
must give exactly what the layer gives with the guard's backward half switched off (the
unfused path, ``guard_backward=False`` on every seed): output, host and kernel gradients,
finite flags; and it must still contain the faults: a non-finite chunk falls back to the
host, a kernel whose backward raises loses only its own gradient.

On the CPU the guard reads its finiteness sums on the host (a load, not a sync) and builds no
mask while every chunk is finite: on this node, on the layer's per-op path and for a
stand-alone seed. Each of those is checked against the device-side test (the path a GPU
takes) bit for bit, and ``torch.jit.trace`` must keep the device-side test.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina.seeds import faults
from kasmina.seeds.faults import all_finite, finite_chunks
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.masks import MAX_PATTERNS, ChunkMasks
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage
from tests.profiling import DispatchedOps, syncs_inside
from tests.seeds.fault_helpers import (
    BATCH,
    RUNNING,
    C,
    RaisesInBackward,
    four_stage_layer,
    make_seed,
)

S = SeedStage
TO_GRAFTING = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING]
TO_STABILIZATION = [*TO_GRAFTING, S.STABILIZATION]
TO_ACTIVE = [*TO_STABILIZATION, S.ACTIVE]


def _walk(seed: GradientIsolatedSeed, stage: SeedStage) -> None:
    path = {
        S.DORMANT: [],
        S.ISOLATED_INIT: TO_GRAFTING[:1],
        S.GRAFTING: TO_GRAFTING,
        S.STABILIZATION: TO_STABILIZATION,
        S.ACTIVE: TO_ACTIVE,
    }[stage]
    for step in path:
        seed.transition_to(step)


class _Poison(nn.Module):
    """A Linear whose output has ``value`` written into it (NaN, inf or a huge finite)."""

    def __init__(self, width: int, value: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y.index_fill(-1, torch.tensor([0], device=y.device), self.value)


def _layer(
    stages: list[SeedStage],
    host: nn.Module,
    chunk: int,
    chunk_dim: int = -1,
    kernels: dict[int, nn.Module] | None = None,
) -> KasminaLayer:
    torch.manual_seed(0)
    layer = KasminaLayer(host, len(stages), chunk, chunk_dim=chunk_dim)
    for k, (seed, stage) in enumerate(zip(layer.seeds, stages, strict=True)):
        if stage == S.DORMANT:
            continue
        kernel = (kernels or {}).get(k)
        if kernel is None:
            conv = chunk_dim == 1 and isinstance(host, nn.Conv2d)
            kernel = nn.Conv2d(chunk, chunk, 1) if conv else nn.Linear(chunk, chunk)
            kernel = nn.Sequential(kernel, nn.Tanh())
        seed.attach_kernel(kernel)
        _walk(seed, stage)
    layer.update_alpha_blending(3, 10)
    return layer


def _unfused(layer: KasminaLayer) -> KasminaLayer:
    twin = copy.deepcopy(layer)
    for seed in twin.seeds:
        seed.guard_backward = False  # the layer's other path: per-op, no backward guard
    return twin


def _nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes within two steps of ``out``."""
    names, frontier = set(), [out.grad_fn]
    for _ in range(3):
        nodes = [node for node in frontier if node is not None]
        names |= {type(node).__name__ for node in nodes}
        frontier = [nxt for node in nodes for nxt, _ in node.next_functions]
    return names


def _run(layer: KasminaLayer, x: torch.Tensor, w: torch.Tensor):
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * w).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, layer._finite_flags.clone(), out


CASES = {
    "all grafting": ([S.GRAFTING] * 4, {}),
    "grafting and stabilization": ([S.GRAFTING, S.STABILIZATION, S.GRAFTING, S.GRAFTING], {}),
    "stabilization only": ([S.STABILIZATION] * 3, {}),
    "a dormant seed passes the host": ([S.GRAFTING, S.DORMANT, S.GRAFTING], {}),
    "a NaN output falls back": ([S.GRAFTING, S.GRAFTING, S.STABILIZATION], {1: float("nan")}),
    "an inf output falls back": ([S.STABILIZATION, S.GRAFTING], {0: float("inf")}),
    "stabilization only, a NaN falls back": ([S.STABILIZATION] * 3, {2: float("nan")}),
}


@pytest.fixture(params=["read on the host", "device test only"])
def finite_read(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The node reads the chunk sums on the host where that is free (CPU tensors) and skips
    the masks when every chunk is finite; "device test only" takes the path a GPU takes."""
    if request.param == "device test only":
        monkeypatch.setattr(faults, "_read_all_finite", lambda sums: False)
    return request.param


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", ["linear", "conv"])
def test_the_one_node_path_gives_the_unfused_values_and_gradients(
    case: str, shape: str, finite_read: str
) -> None:
    stages, poison = CASES[case]
    n, chunk = len(stages), 3
    if shape == "linear":
        host, dim, x = nn.Linear(5, n * chunk), -1, torch.randn(2, 7, 5)
    else:
        host, dim, x = nn.Conv2d(2, n * chunk, 3, padding=1), 1, torch.randn(2, 2, 5, 4)
    kernels = {k: _Poison(chunk, v) for k, v in poison.items()}
    if shape == "conv":
        kernels = {k: _ConvPoison(chunk, v) for k, v in poison.items()}
    layer = _layer(stages, host, chunk, dim, kernels)
    twin = _unfused(layer)
    w = torch.randn(host(x).shape)
    out, gx, grads, flags, raw = _run(layer, x, w)
    assert "GuardedBlendBackward" in _nodes(raw)
    want_out, want_gx, want_grads, want_flags, raw_twin = _run(twin, x, w)
    assert "GuardedBlendBackward" not in _nodes(raw_twin)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=0)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=0)
    assert torch.equal(flags, want_flags)
    assert flags.tolist() == [k not in poison for k in range(n)]


class _ConvPoison(nn.Module):
    def __init__(self, width: int, value: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 1)
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).index_fill(1, torch.tensor([0]), self.value)


@pytest.mark.parametrize("blend", [True, False])
def test_a_fallen_back_seed_gets_exactly_zero_even_from_a_non_finite_gradient(blend: bool) -> None:
    """The per-op path's ``where`` sends a seed whose chunk fell back exactly 0; so does the
    node, even where the gradient arriving from above is inf (``0 * inf`` would be NaN)."""
    stages = [S.GRAFTING if blend else S.STABILIZATION, S.STABILIZATION]
    layer = _layer(stages, nn.Linear(3, 4), 2, kernels={0: _Poison(2, float("nan"))})
    twin = _unfused(layer)
    x, w = torch.randn(5, 3), torch.randn(5, 4)
    w[:, 1] = float("inf")  # only over the chunk that falls back (its unpoisoned column)
    _, _, grads, _, raw = _run(layer, x, w)
    assert "GuardedBlendBackward" in _nodes(raw)
    _, _, want, _, _ = _run(twin, x, w)
    assert grads.keys() == want.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want[name], rtol=0, atol=0)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in layer.seed(0).kernel.parameters())


def test_a_raising_backward_costs_only_its_own_gradient_on_the_one_node_path() -> None:
    layer = _layer([S.GRAFTING] * 3, nn.Linear(4, 6), 2, kernels={1: RaisesInBackward(2)})
    healthy = copy.deepcopy(layer)
    healthy.seed(1).detach_kernel()
    x, w = torch.randn(5, 4), torch.randn(5, 6)
    out = layer(x)
    assert "GuardedBlendBackward" in _nodes(out)
    (out * w).sum().backward()  # the host's backward completes
    (healthy(x) * w).sum().backward()
    assert [s.faults for s in layer.seeds] == [0, 1, 0]
    assert layer.seed(1).fault_log[-1].startswith("backward raised RuntimeError")
    assert layer.seed(1).kernel.scale.grad is None
    for k in (0, 2):
        for p, q in zip(
            layer.seed(k).seed_parameters(), healthy.seed(k).seed_parameters(), strict=True
        ):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    assert layer.host.weight.grad is None  # GRAFTING gives the host no gradient through a slot


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


def test_no_grad_and_eval_take_the_values_without_a_node() -> None:
    layer = _layer([S.GRAFTING, S.GRAFTING], nn.Linear(3, 4), 2, kernels={1: _Poison(2, 3e38)})
    x = torch.randn(3, 3)
    with torch.no_grad():
        out = layer(x)
    assert out.grad_fn is None
    # The fault is the seed's (charged at the poll); no gradient was recorded to drop.
    assert layer._finite_flags.tolist() == [True, True]
    assert layer._fault_flags.tolist() == [False, True]
    want = _unfused(layer)(x).detach()
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("first", [S.GRAFTING, S.STABILIZATION])
def test_an_inference_mode_forward_leaves_no_mask_a_backward_cannot_save(
    first: S, finite_read: str
) -> None:
    """The mask of the seeds that did not run is cached per pattern; one first made in an
    inference-mode forward (a validation pass, ``generate``) was an inference tensor, and
    every later training step differentiated twice (``create_graph``: a gradient penalty)
    raised saving it, for good."""
    layer = _layer([first, S.DORMANT], nn.Linear(3, 4), 2)
    twin = copy.deepcopy(layer)
    x = torch.randn(5, 3)
    with torch.inference_mode():
        layer(x)
    for slot in (layer, twin):
        xs = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(slot(xs).pow(2).sum(), xs, create_graph=True)
        gx.pow(2).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_one_node_path_matches_in_every_dtype_and_backend(
    dtype: torch.dtype, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths blend through the op's own forward and backward (the Triton kernels under
    ``KASMINA_BACKEND=triton``, through the interpreter here): bit for bit the same."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    stages = [S.GRAFTING, S.STABILIZATION, S.GRAFTING]
    layer = _layer(stages, nn.Linear(4, 6), 2, kernels={2: _Poison(2, float("nan"))}).to(dtype)
    twin = _unfused(layer)
    x, w = torch.randn(3, 5, 4, dtype=dtype), torch.randn(3, 5, 6, dtype=dtype)
    out, gx, grads, flags, raw = _run(layer, x, w)
    assert "GuardedBlendBackward" in _nodes(raw)
    want_out, want_gx, want_grads, want_flags, _ = _run(twin, x, w)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=0)
    assert flags.tolist() == want_flags.tolist() == [True, True, False]


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


def _post(out: torch.Tensor, identity: torch.Tensor, op: str, inplace: bool) -> torch.Tensor:
    """What a model does right after a slot: ``nn.ReLU(inplace=True)``, or a ResNet block's
    ``out += identity``; in place, or the same computation out of place."""
    if op == "relu":
        return out.relu_() if inplace else torch.relu(out)
    if inplace:
        out += identity
        return out
    return out + identity


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("guard", [True, False], ids=["guarded", "unguarded"])
@pytest.mark.parametrize("poison", [None, float("nan")], ids=["finite", "NaN"])
@pytest.mark.parametrize("stage", [S.GRAFTING, S.STABILIZATION, S.ACTIVE], ids=lambda s: s.name)
@pytest.mark.parametrize("shape", ["linear", "conv"])
@pytest.mark.parametrize("op", ["relu", "add"])
def test_the_slot_output_may_be_modified_in_place(
    op: str,
    shape: str,
    stage: SeedStage,
    poison: float | None,
    guard: bool,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slot's output behaves like the bare module's: a ``relu_`` or ``+=`` right after it
    runs in every stage, guarded or not, with a non-finite chunk or without, and gives the
    values and gradients (host, seeds, input, the skip branch) of the same computation done
    out of place, bit for bit. Autograd forbids modifying in place a custom Function's output
    that is a view of one of its temporaries (the blend flattened from ``[..., n, W]``, or
    moved back to a non-last ``chunk_dim``)."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    n, chunk = 2, 3
    if shape == "linear":
        host, dim, x = nn.Linear(5, n * chunk), -1, torch.randn(2, 7, 5)
        kernels = {} if poison is None else {1: _Poison(chunk, poison)}
    else:
        host, dim, x = nn.Conv2d(2, n * chunk, 3, padding=1), 1, torch.randn(2, 2, 5, 4)
        kernels = {} if poison is None else {1: _ConvPoison(chunk, poison)}
    layer = _layer([stage] * n, host, chunk, dim, kernels)
    for seed in layer.seeds:
        seed.guard_backward = guard
    twin = copy.deepcopy(layer)
    w = torch.randn(host(x).shape)
    identity = torch.randn(w.shape)
    results = []
    for slot, inplace in ((layer, True), (twin, False)):
        h, skip = x.clone().requires_grad_(), identity.clone().requires_grad_()
        out = slot(h)
        fused = guard and stage != S.ACTIVE
        assert ("GuardedBlendBackward" in _nodes(out)) == fused
        out = _post(out, skip, op, inplace)
        (out * w).sum().backward()
        grads = {name: p.grad for name, p in slot.named_parameters() if p.grad is not None}
        results.append((out.detach(), h.grad, skip.grad, grads, slot._finite_flags.tolist()))
    (got, gx, gskip, grads, flags), (want, wx, wskip, want_grads, want_flags) = results
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(gx, wx, rtol=0, atol=0)
    if op == "add":
        torch.testing.assert_close(gskip, wskip, rtol=0, atol=0)
    assert grads.keys() == want_grads.keys()
    assert any(name.startswith("seeds.") for name in grads)  # the seeds did train
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=0)
    assert flags == want_flags == [True, poison is None]


class _Block(nn.Module):
    """A slot followed by in-place ops, as in a ResNet block: ``out += identity; relu_()``
    (or the same out of place)."""

    def __init__(self, slot: KasminaLayer, inplace: bool) -> None:
        super().__init__()
        self.slot = slot
        self.inplace = inplace

    def forward(self, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        out = self.slot(x)
        return _post(_post(out, identity, "add", self.inplace), identity, "relu", self.inplace)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("shape", ["linear", "conv"])
def test_a_compiled_slot_output_may_be_modified_in_place(shape: str, compiler: str) -> None:
    """Under ``torch.compile(fullgraph=True)`` a GRAFTING slot's output takes the same in-place
    ops (the blend is then the custom op, whose output, run by eager autograd under the
    ``eager`` backend, must not be a view either): the values and gradients of the eager,
    out-of-place computation. The first call records the slot's output contract, the second
    runs the graph compiled without the recording: both count."""
    torch._dynamo.reset()
    if shape == "linear":
        host, dim, x = nn.Linear(5, 6), -1, torch.randn(2, 7, 5)
    else:
        host, dim, x = nn.Conv2d(2, 6, 3, padding=1), 1, torch.randn(2, 2, 5, 4)
    slot = _layer([S.GRAFTING, S.GRAFTING], host, 3, dim)
    block, twin = _Block(slot, inplace=True), _Block(copy.deepcopy(slot), inplace=False)
    compiled = torch.compile(block, backend=compiler, fullgraph=True)
    identity = torch.randn(host(x).shape)
    for _ in range(2):
        results = []
        for model in (compiled, twin):
            for p in block.parameters() if model is compiled else twin.parameters():
                p.grad = None
            h = x.clone().requires_grad_()
            out = model(h, identity)
            out.sum().backward()
            params = block.named_parameters() if model is compiled else twin.named_parameters()
            grads = {name: p.grad for name, p in params if p.grad is not None}
            results.append((out.detach(), h.grad, grads))
        (got, gx, grads), (want, wx, want_grads) = results
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(gx, wx, rtol=0, atol=0)
        assert grads.keys() == want_grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], want_grads[name], rtol=0, atol=0)


_TO = {S.DORMANT: [], S.ISOLATED_INIT: [S.ISOLATED_INIT], S.GRAFTING: TO_GRAFTING}
_TO |= {S.STABILIZATION: TO_STABILIZATION, S.ACTIVE: TO_ACTIVE}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(
    "stages",
    [
        (S.GRAFTING, S.DORMANT),
        (S.GRAFTING, S.GRAFTING),
        (S.GRAFTING, S.ACTIVE),
        (S.GRAFTING, S.ISOLATED_INIT),
        (S.STABILIZATION, S.ACTIVE),
    ],
    ids=lambda st: "+".join(s.name for s in st),
)
@pytest.mark.parametrize("chunked", ["channels", "width"])
def test_a_conv_slot_keeps_its_hosts_layout_while_its_seeds_blend(
    stages, layout: torch.memory_format, backend: str, chunked: str, monkeypatch
) -> None:
    """The blend runs along a moved chunk dim (channels last); the slot's output must still
    have the host's own strides, so that a CNN's ``y.view(len(y), -1)`` after it works. The
    op returns the moved layout (on the Triton path for every blending mix, on the reference
    path for the per-op one); the slot puts the host's back. Chunked along the last dim (a
    conv block's default, its width), the blend's contiguous output lost a channels-last
    host's layout, in GRAFTING and in STABILIZATION."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=layout)
    if chunked == "channels":
        layer, kernel = KasminaLayer(conv, 2, 2, chunk_dim=1), lambda: nn.Conv2d(2, 2, 1)
    else:
        layer, kernel = KasminaLayer(nn.Sequential(conv), 2, 3), lambda: nn.Linear(3, 3)
    for seed, stage in zip(layer.seeds, stages, strict=True):
        if stage != S.DORMANT:
            seed.attach_kernel(nn.Sequential(kernel(), nn.Tanh()))
        for step in _TO[stage]:
            seed.transition_to(step)
    layer.update_alpha_blending(3, 10)
    x = torch.randn(2, 3, 5, 6).contiguous(memory_format=layout)
    want = layer.host(x).stride()
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            y = layer(x)
        assert y.stride() == want, (grad, y.stride())
        flat = y.view(len(y), -1) if layout == torch.contiguous_format else y.flatten(1)
        if grad:
            flat.square().sum().backward()


class BatchFirstLSTM(nn.Module):
    """``pre -> LSTM(batch_first) -> mean over time -> head``: the LSTM's output is a transposed
    view (its ``[T, B, H]`` buffer), which the next reduction reads in that order."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pre, self.rnn, self.head = (
            nn.Linear(3, 4),
            nn.LSTM(4, 4, batch_first=True),
            nn.Linear(4, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.pre(x))[0].mean(1))


class TimeMajor(nn.Module):
    """A ``Linear`` over time-major rows, its output turned back batch-first: a transposed view."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("stages", [(S.ISOLATED_INIT, S.DORMANT), (S.GRAFTING, S.ISOLATED_INIT)])
def test_a_slot_keeps_a_transposed_host_outputs_layout(stages) -> None:
    """A ``batch_first`` RNN's output is a permuted dense block. The slot's output came back
    contiguous, so the reductions after it ran in another order: in ISOLATED_INIT the host's
    gradients (``head.weight``'s) differed from the seedless run in their last bits. Compiled
    with dynamic shapes too (no sort of the dims by their symbolic strides)."""
    from kasmina.seeds.inject import attach

    model, bare = BatchFirstLSTM(), BatchFirstLSTM()
    (slot,) = attach(model, ["rnn"], 2, 2)
    for seed, stage in zip(slot.seeds, stages, strict=True):
        if stage != S.DORMANT:
            seed.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
        for step in _TO[stage]:
            seed.transition_to(step)
    slot.update_alpha_blending(3, 10)
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(1))
    hidden = model.pre(x)
    assert slot(hidden)[0].stride() == slot.host(hidden)[0].stride() == (4, 24, 1)
    if stages[0] == S.ISOLATED_INIT:  # the host's values and gradients, bit for bit
        model(x).square().sum().backward()
        bare(x).square().sum().backward()
        grads = {n.replace(".host.", "."): p.grad for n, p in model.named_parameters()}
        for name, q in bare.named_parameters():
            assert torch.equal(grads[name], q.grad), name
    # Compiled (TorchDynamo takes no LSTM: a time-major Linear gives the same transposed
    # output), with symbolic strides, which a sort of the dims by them could not trace.
    (compiled_slot,) = attach(nn.Sequential(TimeMajor()), ["0"], 2, 2)
    for seed, stage in zip(compiled_slot.seeds, stages, strict=True):
        if stage != S.DORMANT:
            seed.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
        for step in _TO[stage]:
            seed.transition_to(step)
    compiled = torch.compile(compiled_slot, fullgraph=True, dynamic=True, backend="aot_eager")
    for length in (5, 7):
        hidden = torch.randn(6, length, 4)
        want = compiled_slot.host(hidden)
        assert want.stride() == (4, 24, 1)
        with torch.no_grad():
            assert torch.equal(compiled(hidden), compiled_slot(hidden))
        assert compiled(hidden).stride() == want.stride()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_grown_model_runs_in_float64_with_the_float32_math(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``model.double()`` (a scientific host, a gradient check of a grown model): every mix of
    stages runs in fp64, where the fused blend's kernels take 16/32-bit floats only (the slot
    blends with the op's plain-torch reference there), with the values and gradients of the
    same layer in fp32, to fp32 rounding."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    for stages in (
        (S.ACTIVE, S.GRAFTING),
        (S.ISOLATED_INIT, S.GRAFTING, S.ACTIVE),
        (S.GRAFTING, S.GRAFTING),
    ):
        torch.manual_seed(0)
        layer = KasminaLayer(nn.Linear(3, 2 * len(stages)), len(stages), 2)
        for seed, stage in zip(layer.seeds, stages, strict=True):
            seed.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
            for step in _TO[stage]:
                seed.transition_to(step)
        layer.update_alpha_blending(3, 10)
        x = torch.randn(4, 3)
        results = []
        for model in (layer, copy.deepcopy(layer).double()):
            dtype = next(model.parameters()).dtype
            out = model(x.to(dtype))
            out.square().sum().backward()
            grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.dtype, out.detach().double(), grads))
        (d32, out32, g32), (d64, out64, g64) = results
        assert (d32, d64) == (torch.float32, torch.float64) and g32.keys() == g64.keys()
        torch.testing.assert_close(out64, out32, rtol=1e-5, atol=1e-6)
        for name in g32:
            torch.testing.assert_close(g64[name], g32[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_host_chunk_passed_through_is_never_a_seeds_fault() -> None:
    """A DORMANT seed's chunk is the host's own output: when the host's values there are not
    finite, the GRAFTING seed beside it is not charged, nothing falls back, and the host's
    passed-through chunk keeps its own gradient."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    layer.seeds[1].attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    for step in TO_GRAFTING:
        layer.seeds[1].transition_to(step)
    layer.update_alpha_blending(3, 10)
    with torch.no_grad():
        layer.host.weight[0, 0] = float("inf")  # the host's chunk 0 overflows
    x = torch.randn(5, 6).abs() + 0.1
    out = layer(x)
    assert not torch.isfinite(out[:, 0]).any() and torch.isfinite(out[:, 1:]).all()
    out[:, 1:].sum().backward()
    assert layer.poll_nonfinite() == [] and layer.seeds[1].faults == 0
    assert torch.equal(layer.host.weight.grad[1], x.sum(0))  # its own chunk, passed through


@pytest.mark.parametrize("guard", [True, False], ids=["one_node", "per_op"])
@pytest.mark.parametrize("first", [S.DORMANT, S.ACTIVE], ids=["dormant", "active"])
def test_a_chunk_that_does_not_blend_keeps_the_hosts_infinities(guard: bool, first: S) -> None:
    """A host may give infinities on purpose (masked logits). Beside a GRAFTING seed, a chunk
    that does not blend is the host's exactly: the host's own chunk passed through, and the
    chunk of a seed that falls back because its input was not finite. Blending them with
    alpha 1 or 0 gave NaN (``lerp(inf, inf, 1)``), on the one-node path, on the per-op path
    and on the path for a slot with an ACTIVE seed."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 6), 3, 2)
    stages = (first, S.GRAFTING, S.GRAFTING)
    for seed, stage in zip(layer.seeds, stages, strict=True):
        seed.attach_kernel(nn.Linear(2, 2))  # an infinite input gives a non-finite output
        _walk(seed, stage)
        seed.guard_backward = guard
    layer.update_alpha_blending(3, 10)
    with torch.no_grad():
        layer.host.weight[0, 0] = float("inf")  # chunk 0: +inf in column 0
        layer.host.weight[2, 0] = -float("inf")  # chunk 1: the GRAFTING seed's input, -inf
    x = torch.rand(5, 6) + 0.1
    host = layer.host(x)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out = layer(x)
        assert torch.equal(out[:, :2], host[:, :2])  # the host's own, or the ACTIVE fallback
        assert torch.equal(out[:, 2:4], host[:, 2:4])  # seed 1 falls back: the host's chunk
        assert torch.isfinite(out[:, 4:]).all() and not torch.equal(out[:, 4:], host[:, 4:])
    assert layer.seeds[1].faults == 0  # the input was not finite: not the seed's fault


@pytest.mark.parametrize("guard", [True, False], ids=["one_node", "per_op"])
@pytest.mark.parametrize("first", [S.ISOLATED_INIT, S.STABILIZATION, S.ACTIVE])
def test_a_seed_that_does_not_blend_keeps_its_value_beside_a_grafting_one(
    guard: bool, first: S
) -> None:
    """A seed that ran and does not blend (alpha 1) beside a GRAFTING one went through the
    blend too, and ``lerp(h, s, 1)`` is ``s - (s - h)·0``: NaN where its host chunk held an
    infinity, though its output was finite (its value is the host's in ISOLATED_INIT). Its
    chunk is now what it is with no GRAFTING seed beside it, on every path."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    for seed, stage in zip(layer.seeds, (first, S.GRAFTING), strict=True):
        seed.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))  # finite for any input
        _walk(seed, stage)
        seed.guard_backward = guard
    layer.update_alpha_blending(3, 10)
    with torch.no_grad():
        layer.host.weight[0, 0] = float("inf")  # chunk 0: +inf in column 0
    x = torch.rand(5, 6) + 0.1
    host = layer.host(x).detach()
    want = host[:, :2] if first == S.ISOLATED_INIT else layer.seeds[0].kernel(host[:, :2])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out = layer(x)
        assert torch.equal(out[:, :2], want.detach())
        assert torch.isfinite(out[:, 2:]).all()
    out[:, 2:].sum().backward()
    assert layer.poll_nonfinite() == [] and [s.faults for s in layer.seeds] == [0, 0]


@pytest.mark.parametrize("stage", [S.GRAFTING, S.STABILIZATION, S.ACTIVE])
def test_a_call_with_no_rows_gives_the_seeds_no_gradient(stage: S) -> None:
    """A slot called with no rows (a mixture-of-experts expert given no tokens) ran its seeds'
    kernels on the empty batch: their gradients were zeros, not None, so a step counted them
    trained (a GRAFTING alpha moved through its schedule on data it never saw, Adam's moments
    moved the weights). The seeds sit such a call out: it is the host's own call."""
    layer = _layer([stage, S.DORMANT], nn.Linear(3, 4), 2)
    x = torch.randn(0, 3, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert all(p.grad is None for p in layer.seeds[0].seed_parameters())
    assert layer.host.weight.grad is not None and x.grad is not None
    # A slot whose seeds all blend stays in the graph too: a reentrant checkpoint around it
    # (an expert given no tokens), or a loss on it, needs an output that requires grad.
    upstream, blending = nn.Linear(3, 3), _layer([S.GRAFTING, S.STABILIZATION], nn.Linear(3, 4), 2)
    h = upstream(torch.randn(0, 3))
    torch.utils.checkpoint.checkpoint(blending, h, use_reentrant=True).sum().backward()
    assert upstream.weight.grad is not None
    layer(torch.randn(5, 3)).sum().backward()  # a batch with rows trains it as before
    assert all(p.grad is not None for p in layer.seeds[0].seed_parameters())


class _OnMeta(nn.Module):
    """A kernel whose output has the right shape and dtype on the wrong device."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.empty(x.shape, dtype=x.dtype, device="meta") * self.scale.to("meta")


def test_an_output_on_another_device_is_a_contained_fault() -> None:
    """Only shape and dtype matched would let a kernel's output on another device reach the
    layer's concatenation and raise in the host's forward: the device is checked too, and the
    seed falls back to the host's chunk with a fault that names it."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(6, 4), 2, 2)
    layer.seeds[1].attach_kernel(_OnMeta())
    _walk(layer.seeds[1], S.GRAFTING)
    x = torch.randn(3, 6)
    out = layer(x)
    assert torch.equal(out, layer.host(x))
    assert layer.seeds[1].faults == 1 and "on meta" in layer.seeds[1].fault_log[-1]


class _PythonIdentity(torch.autograd.Function):
    """A custom op as a user's model holds one: a Python node above the slot."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad


@pytest.mark.parametrize("above", ["custom op", "full backward hook"])
@pytest.mark.parametrize("stages", [[S.GRAFTING] * 2, [S.STABILIZATION, S.GRAFTING]])
def test_the_host_above_a_blending_slot_gets_no_gradient_not_zeros(
    stages: list[SeedStage], above: str
) -> None:
    """In GRAFTING and STABILIZATION the host gets no gradient through the slot: its weights
    above it keep ``grad`` None, as on the per-op path, even where a Python node above the
    slot would turn a missing gradient into zeros (an optimizer with momentum would step
    weights on those); a full backward hook on the slot sees no gradient, and does not run."""
    layer = _layer(stages, nn.Linear(3, 4), 2)
    torch.manual_seed(1)
    up = nn.Linear(3, 3)
    fired = []
    if above == "full backward hook":
        layer.register_full_backward_hook(lambda *args: fired.append(1))
    x = torch.randn(5, 3)
    for model in (layer, _unfused(layer)):
        up.zero_grad(set_to_none=True)
        mid = up(x)
        if above == "custom op":
            mid = _PythonIdentity.apply(mid)
        out = model(mid)
        assert out.requires_grad
        out.sum().backward()
        assert up.weight.grad is None and up.bias.grad is None
        assert model.host.weight.grad is None
        assert all(p.grad is not None for p in model.seeds.parameters())
    assert fired == []


@pytest.mark.parametrize("shape", ["linear", "conv"])
def test_a_slot_compiles_whole_under_a_default_device(shape: str) -> None:
    """A user's ``torch.set_default_device`` (common in model code) puts a device mode on,
    under which TorchDynamo cannot trace ``Tensor.unflatten``: ``torch.compile(fullgraph=True)``
    of a slot with running seeds failed. The chunks are split by a view instead."""
    torch.set_default_device("cpu")
    try:
        torch._dynamo.reset()
        if shape == "linear":
            host, dim, x = nn.Linear(5, 6), -1, torch.randn(2, 7, 5)
        else:
            host, dim, x = nn.Conv2d(2, 6, 3, padding=1), 1, torch.randn(2, 2, 5, 4)
        for stages in ([S.GRAFTING, S.GRAFTING], [S.GRAFTING, S.ISOLATED_INIT]):
            slot = _layer(stages, host, 3, dim)
            twin = _Block(copy.deepcopy(slot), inplace=False)
            block = _Block(slot, inplace=False)
            compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
            identity = torch.randn(host(x).shape)
            for _ in range(2):
                torch.testing.assert_close(compiled(x, identity), twin(x, identity))
    finally:
        torch.set_default_device(None)


def _forward_tangent(layer, x, v, tangents, dual_of, grad_mode: bool, node: bool):
    """The slot's output and tangent under ``forward_ad`` (parameters in ``tangents`` made dual
    by ``dual_of``, the input by ``v`` unless None), with the one-node graft run or not."""
    import torch.autograd.forward_ad as fwad

    params = dict(layer.named_parameters())
    with torch.set_grad_enabled(grad_mode), fwad.dual_level():
        duals = {n: fwad.make_dual(dual_of(p), tangents[n]) if n in tangents else p
                 for n, p in params.items()}  # fmt: skip
        xd = x if v is None else fwad.make_dual(x, v)
        out = torch.func.functional_call(layer, duals, (xd,))
        if grad_mode:  # which path ran: the node, or the per-op path's rules
            assert ("GuardedBlendBackward" in _nodes(out)) == node
        return fwad.unpack_dual(out)


def _adjoint(layer, x, v, tangents, g) -> torch.Tensor:
    """``<t, vjp(g)>`` of the slot's reverse mode in the directions ``v`` (input) and
    ``tangents`` (parameters); also checks that reverse mode gives the forward's primal."""
    params = dict(layer.named_parameters())
    xr = x.clone().requires_grad_()
    reverse = layer(xr)
    grads = torch.autograd.grad((reverse * g).sum(), [xr, *params.values()], allow_unused=True)
    directions = [v, *(tangents.get(n) for n in params)]
    pairs = zip(directions, grads, strict=True)
    terms = [(d * gr).sum() for d, gr in pairs if gr is not None and d is not None]
    return sum(terms, torch.zeros(()))  # none: the host detached from every chunk


@pytest.mark.parametrize("directions", ["host and seeds", "host"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_mode_ad_through_the_node_is_the_transpose_of_its_backward(
    case: str, directions: str
) -> None:
    """``torch.autograd.forward_ad`` through the one-node graft raised ``NotImplementedError``
    (a deliberate refusal where a rule belongs). Now its tangent, in the input's and the
    host's parameters' direction (the node runs) or theirs and every seed kernel's at once
    (the seeds' outputs carry tangents: the per-op path's rules take them), satisfies
    ``<jvp(t), g> == <t, vjp(g)>`` against the backward, fallbacks included (a chunk that
    fell back contributes nothing, whatever its seed's tangent holds). The blend detaches the
    host: with no chunk passed through, the host's directions give the slot no tangent."""
    stages, poison = CASES[case]
    chunk = 2
    kernels = {k: _Poison(chunk, v) for k, v in poison.items()}
    layer = _layer(stages, nn.Linear(3, chunk * len(stages)), chunk, kernels=kernels)
    gen = torch.Generator().manual_seed(len(case))
    x, v = torch.randn(BATCH, 3, generator=gen), torch.randn(BATCH, 3, generator=gen)
    tangents = {
        n: torch.randn(p.shape, generator=gen)
        for n, p in layer.named_parameters()
        if directions == "host and seeds" or n.startswith("host.")
    }
    layer(x)  # records the slot's shapes
    node = directions == "host"
    primal, tangent = _forward_tangent(layer, x, v, tangents, lambda p: p, True, node)
    if node and S.DORMANT not in stages:  # no chunk is the host's: no tangent reaches the slot
        assert tangent is None
        tangent = torch.zeros_like(primal)
    assert tangent is not None and torch.isfinite(tangent).all()
    g = torch.randn(primal.shape, generator=gen)
    torch.testing.assert_close(layer(x), primal, rtol=0, atol=0)
    adjoint = _adjoint(layer, x, v, tangents, g)
    torch.testing.assert_close((tangent * g).sum(), adjoint, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("duals", ["no_grad", "detached parameters"])
@pytest.mark.parametrize(
    "stages",
    [
        [S.GRAFTING],
        [S.GRAFTING, S.GRAFTING],
        [S.GRAFTING, S.STABILIZATION],
        [S.GRAFTING, S.DORMANT],
    ],
    ids=["grafting", "grafting-grafting", "grafting-stabilization", "grafting-dormant"],
)
def test_forward_mode_ad_keeps_a_seed_tangent_the_node_cannot_see(
    stages: list[S], duals: str
) -> None:
    """Forward mode with the seeds' outputs not requiring grad (``forward_ad`` under
    ``torch.no_grad()``, which keeps tangents, or ``functional_call`` with duals of detached
    parameters) took the one-node graft, which takes tangents only from its island (outputs
    that need a gradient): the seeds' tangents were silently dropped ([GRAFTING, GRAFTING]
    gave 0 where the adjoint is not). Now a seed output with a tangent sends the slot down
    the per-op path, and the tangent in every parameter's direction equals the reverse-mode
    adjoint ``<t, vjp(g)>``."""
    layer = _layer(stages, nn.Linear(3, 2 * len(stages)), 2)
    gen = torch.Generator().manual_seed(len(stages))
    x = torch.randn(BATCH, 3, generator=gen)
    layer(x)  # records the slot's shapes
    for only in ("seeds.", ""):  # the seeds' parameters alone, then every one
        params = dict(layer.named_parameters())
        tangents = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
        tangents = {n: t for n, t in tangents.items() if n.startswith(only)}
        grad_mode = duals != "no_grad"
        primal, tangent = _forward_tangent(
            layer, x, None, tangents, lambda p: p.detach(), grad_mode, False
        )
        assert tangent is not None, only
        g = torch.randn(primal.shape, generator=gen)
        adjoint = _adjoint(layer, x, None, tangents, g)
        assert adjoint.abs() > 1e-3  # a dropped seed tangent cannot pass unnoticed
        torch.testing.assert_close((tangent * g).sum(), adjoint, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "stages",
    [[S.ISOLATED_INIT, S.GRAFTING], [S.ISOLATED_INIT, S.ISOLATED_INIT], [S.GRAFTING, S.DORMANT]],
    ids=["isolated-grafting", "isolated-isolated", "grafting-dormant"],
)
def test_forward_mode_ad_reaches_the_kd_loss_through_isolated_seeds(stages: list[S]) -> None:
    """An isolated seed's output reaches the KD loss through the contained-backward node:
    forward mode through it raised torch's "You must implement the jvp function", and a
    tangent missing beside another (only one seed's parameters dual) failed an internal
    assert. Now the KD loss's and the output's tangents in every parameter's direction at
    once equal the reverse-mode adjoint, ``<jvp(t), g> == <t, vjp(g)>``."""
    import torch.autograd.forward_ad as fwad

    from kasmina.kd.config import KDConfig

    layer = _layer(stages, nn.Linear(3, 4), 2)
    layer.kd_config = KDConfig(temperature=2.0)
    for seed in layer.seeds:
        seed.kd_config = layer.kd_config
    gen = torch.Generator().manual_seed(3)
    x, teacher = torch.randn(BATCH, 3, generator=gen), torch.randn(BATCH, 4, generator=gen)
    layer(x)  # records the slot's shapes
    params = dict(layer.named_parameters())
    for only in (None, "seeds.0.", "seeds.1."):  # every parameter, then each seed's alone
        tangents = {
            n: torch.randn(p.shape, generator=gen)
            for n, p in params.items()
            if only is None or n.startswith(only)
        }
        if not tangents:  # a DORMANT seed has no kernel
            continue
        g = torch.randn(BATCH, 4, generator=gen)
        with fwad.dual_level():
            duals = {n: fwad.make_dual(p, tangents[n]) if n in tangents else p
                     for n, p in params.items()}  # fmt: skip
            out = torch.func.functional_call(layer, duals, (x,), {"teacher_logits": teacher})
            t_out = fwad.unpack_dual(out).tangent
            t_kd = fwad.unpack_dual(layer.get_and_clear_kd_losses()).tangent
        out = layer(x, teacher_logits=teacher)
        kd = layer.get_and_clear_kd_losses()
        assert kd is not None and t_kd is not None
        for got, value in ((t_kd, kd), (t_out, (out * g).sum())):
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
            adjoint = sum(
                (tangents[n] * gr).sum()
                for n, gr in zip(params, grads, strict=True)
                if gr is not None and n in tangents
            )
            want = torch.as_tensor(adjoint, dtype=torch.float32)
            have = got if value is kd else (torch.zeros(()) if got is None else (got * g).sum())
            torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)
