"""A slot's output as the model after it uses it.

It may be modified in place (``relu_``, ``+=``) in every stage, guarded or not, eager or
compiled, with the values and gradients of the same computation done out of place; it keeps the
host's memory layout (channels last, a transposed RNN output), compiled with dynamic shapes too;
a grown model runs in float64 with the float32 math; and a slot compiles whole under a default
device.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.blend_helpers import (
    TO_ACTIVE,
    TO_GRAFTING,
    TO_STABILIZATION,
    _ConvPoison,
    _layer,
    _nodes,
    _Poison,
)

S = SeedStage


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


# ---------------------------------------------------------------------------- layouts


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


# ---------------------------------------------------------------------------- float64


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
