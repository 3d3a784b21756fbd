"""The one-node guarded graft (``island.GuardedBlend``) against the unguarded layer path.

A layer whose running seeds all blend against the detached host (GRAFTING, STABILIZATION)
takes one autograd node for its guard's device half, the blend and the backward guard. It
must give exactly what the layer gives with the guard's backward half switched off (the
unfused path, ``guard_backward=False`` on every seed): output, host and kernel gradients,
finite flags, in every dtype and backend; and it must still contain the faults: a non-finite
chunk falls back to the host, a kernel whose backward raises loses only its own gradient. The
host above a blending slot gets no gradient, not zeros.

A chunk that does not blend is the host's exactly, infinities included, and no seed's fault; a
call with no rows trains no seed; an output on another device is a contained fault.

How the guard tests finiteness is in test_finite_checks.py, the slot's output as the model after
it uses it in test_blend_outputs.py, forward-mode AD in test_blend_forward_ad.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina.seeds import faults
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.blend_helpers import (
    CASES,
    TO_GRAFTING,
    _ConvPoison,
    _layer,
    _nodes,
    _Poison,
    _run,
    _walk,
)
from tests.seeds.fault_helpers import RaisesInBackward

S = SeedStage


def _unfused(layer: KasminaLayer) -> KasminaLayer:
    twin = copy.deepcopy(layer)
    for seed in twin.seeds:
        seed.guard_backward = False  # the layer's other path: per-op, no backward guard
    return twin


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


@pytest.mark.parametrize("first", [S.GRAFTING, S.STABILIZATION], ids=lambda s: s.name)
def test_a_non_finite_gradient_over_a_seeds_chunk_gives_the_host_exactly_zero(first) -> None:
    """Beside a chunk the host passes through, the node gives the host its gradient there and
    exactly 0 over a seed's chunk, as the per-op path does, even where the gradient from above
    is NaN or inf there: ``g * passed`` was ``NaN * 0``, so a NaN target over a seed's chunk
    made the host's weights NaN through a chunk that gives it nothing."""
    layer = _layer([first, S.DORMANT], nn.Linear(3, 4), 2)
    twin = _unfused(layer)
    x, w = torch.randn(5, 3), torch.randn(5, 4)
    w[1, 0], w[2, 1] = float("nan"), float("inf")  # over seed 0's chunk only
    _, gx, grads, _, raw = _run(layer, x, w)
    assert "GuardedBlendBackward" in _nodes(raw)
    _, want_gx, want, _, _ = _run(twin, x, w)
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=0)
    for name in ("host.weight", "host.bias"):
        torch.testing.assert_close(grads[name], want[name], rtol=0, atol=0)
    assert torch.equal(grads["host.weight"][:2], torch.zeros(2, 3))


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


# ------------------------------------------------------------------ chunks that do not blend


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


@pytest.mark.parametrize("how", ["parameter", "parametrized"])
def test_a_grafting_seeds_alpha_the_user_made_a_parameter_still_blends(how: str) -> None:
    """The layer reads each GRAFTING seed's alpha from its buffers (a plain attribute read goes
    through ``Module.__getattr__`` after a failed lookup); an alpha a user made a learnable
    ``Parameter`` or parametrized is not there, and the forward raised ``KeyError``. It is
    read as an attribute then, and the blend is the one of the buffer it replaced."""
    torch.manual_seed(0)
    layer = _layer([SeedStage.GRAFTING, SeedStage.GRAFTING], nn.Linear(8, 8), 4)
    layer.update_alpha_blending(3, 10)
    x = torch.randn(3, 8)
    expected = layer(x).detach()
    seed = layer.seeds[0]
    if how == "parameter":
        seed.alpha = nn.Parameter(seed.alpha.detach().clone())
    else:
        torch.nn.utils.parametrize.register_parametrization(seed, "alpha", nn.Identity())
    assert "alpha" not in seed._buffers
    out = layer(x)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)
    if how == "parameter":
        assert seed.alpha.grad is not None
