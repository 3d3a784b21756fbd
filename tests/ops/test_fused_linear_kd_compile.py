"""fused_linear_kd_loss's custom ops and ``torch.compile``: opcheck of the three ops,
``fullgraph`` with dynamic shapes, a symbolic ``chunk_rows``, the default chunk over a dynamic
row count (and ``torch.export``), compiled against eager, and the compiled backward spending
the fp32 accumulators in place (and running twice)."""

from __future__ import annotations

import pytest
import torch

import kasmina.ops.fused_linear_kd_chunks as chunks
from kasmina.ops import fused_linear_kd_loss
from tests.ops.fused_linear_kd_helpers import _close, _inputs, _oracle, _use_backend
from tests.ops.kd_helpers import DEVICE, KERNEL_WARNINGS, _gen

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiles_with_dynamic_shapes(monkeypatch, backend):
    """``torch.compile(fullgraph=True, dynamic=True)``: a float argument may be traced as a
    ``SymFloat`` (the default ``temperature`` is), so the checks take no ``math.isfinite``; loss
    and gradients equal the float64 oracle's for two batch sizes."""
    _use_backend(monkeypatch, backend)
    torch._dynamo.reset()

    def step(h, w, b, t):  # the default temperature (1.0)
        return fused_linear_kd_loss(h, w, t, student_bias=b, chunk_rows=4)

    fn = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows, seed in ((5, 62), (7, 63)):
        h, w, b, _, _, _, tl, _ = _inputs((rows,), 8, 11, torch.float32, seed=seed)
        loss = fn(h, w, b, tl)
        got = torch.autograd.grad(loss, (h, w, b))
        want_loss, want = _oracle(h, w, b, tl, 1.0, "batchmean")
        _close(loss, want_loss, torch.float32, "loss")
        for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
            _close(x, y, torch.float32, what)
    torch._dynamo.reset()


def test_a_symbolic_chunk_rows_compiles_fullgraph(monkeypatch):
    """``chunk_rows`` derived from a dynamic batch, or an int argument that changes between
    calls (TorchDynamo makes it symbolic), failed a fullgraph compile: the check's ``getattr``
    probe cannot be traced on a ``SymInt``. Loss and gradients equal the oracle's."""
    _use_backend(monkeypatch, "reference")
    torch._dynamo.reset()

    def halves(h, w, b, t):
        return fused_linear_kd_loss(h, w, t, student_bias=b, chunk_rows=h.shape[0] // 2)

    def given(h, w, b, t, c):
        return fused_linear_kd_loss(h, w, t, student_bias=b, chunk_rows=c)

    by_shape = torch.compile(halves, fullgraph=True, backend="aot_eager")
    by_argument = torch.compile(given, fullgraph=True, backend="aot_eager")
    for rows, seed in ((6, 70), (8, 71)):
        h, w, b, _, _, _, tl, _ = _inputs((rows,), 8, 11, torch.float32, seed=seed)
        torch._dynamo.mark_dynamic(h, 0)
        torch._dynamo.mark_dynamic(tl, 0)
        want_loss, want = _oracle(h, w, b, tl, 1.0, "batchmean")
        for loss in (by_shape(h, w, b, tl), by_argument(h, w, b, tl, rows // 2 + 1)):
            _close(loss, want_loss, torch.float32, "loss")
            got = torch.autograd.grad(loss, (h, w, b))
            for x, y, what in zip(got, want, ("hidden", "weight", "bias"), strict=True):
                _close(x, y, torch.float32, what)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_default_chunk_keeps_a_dynamic_row_count_dynamic(monkeypatch, backend):
    """Without ``chunk_rows``, the default chunk is the budget's whatever the symbolic row count:
    comparing the two guarded the graph on it, and ``torch.export`` with a dynamic batch
    raised a constraint violation. The exported program and a dynamic compile give the
    oracle's loss for a count under the chunk and one split into several chunks."""
    _use_backend(monkeypatch, backend)
    per_row = 11 * (2 * 4 + (chunks.CPU_SCRATCH_BYTES if DEVICE.type != "cuda" else 0))
    budget = "DEFAULT_CHUNK_BYTES" if DEVICE.type == "cuda" else "DEFAULT_CPU_CHUNK_BYTES"
    monkeypatch.setattr(chunks, budget, 64 * per_row)  # 64 rows a chunk (one row multiple)

    class Head(torch.nn.Module):
        def forward(self, h, w, b, t):
            return fused_linear_kd_loss(h, w, t, student_bias=b, temperature=2.0)

    h, w, b, _, _, _, tl, _ = _inputs((6,), 8, 11, torch.float32, seed=64)
    rows = torch.export.Dim("rows", min=2, max=1 << 20)
    shapes = ({0: rows}, None, None, {0: rows})
    program = torch.export.export(Head(), (h, w, b, tl), dynamic_shapes=shapes).module()
    torch._dynamo.reset()
    compiled = torch.compile(Head(), fullgraph=True, dynamic=True, backend="aot_eager")
    for n, seed in ((3, 65), (150, 66)):
        h, w, b, _, _, _, tl, _ = _inputs((n,), 8, 11, torch.float32, seed=seed)
        want, _ = _oracle(h, w, b, tl, 2.0, "batchmean")
        _close(program(h, w, b, tl), want, torch.float32, f"exported, {n} rows")
        _close(compiled(h, w, b, tl), want, torch.float32, f"compiled, {n} rows")
    torch._dynamo.reset()


def test_custom_ops_pass_opcheck():
    """Schema, fake tensors, autograd registration and AOT dispatch of the custom ops. With a
    scalar reduction the forward op's gradient buffers are spent in place by the backward
    (``kasmina::fused_linear_kd_spend_``), so they may not be returned from a compiled graph,
    which opcheck's AOT test does with every output; the public function returns the loss
    alone, and the compile tests below run that path."""
    h, w, b, th, tw, _, _, mask = _inputs((2, 5), 8, 33, torch.float32, seed=15)
    temp = torch.tensor(2.0, dtype=torch.float64)  # the temperature: an input, not a constant
    every = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_static", "test_aot_dispatch_dynamic")  # fmt: skip
    for reduction in ("batchmean", "none"):
        args = (h, w, b, None, th, tw, None, mask, temp, reduction, 4, 0.5, None, 5.0, None,
                True, True, True)  # fmt: skip
        checks = every if reduction == "none" else every[:3]
        torch.library.opcheck(torch.ops.kasmina.fused_linear_kd_loss, args, test_utils=checks)
    with torch.no_grad():
        outputs = torch.ops.kasmina.fused_linear_kd_loss(*args[:9], "sum", *args[10:])
    grad_h, acc_w, acc_b, scale, _, spent = outputs[1:]
    spend = (torch.tensor(0.5), grad_h, acc_w, acc_b, scale, spent, h.detach(), w.detach(),
             b.detach(), None, th, tw, None, mask, temp, "sum", 4, 0.5, None, 5.0, None, True,
             True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.kasmina.fused_linear_kd_spend_, spend)
    stats = torch.rand(10, 4, generator=_gen(16)) + 1.0
    grad_output = torch.rand(2, 5, generator=_gen(17))
    args = (h.detach(), w.detach(), b.detach(), None, th, tw, None, mask, stats, grad_output,
            temp, 4, 0.5, None, 5.0, None, True, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.kasmina.fused_linear_kd_loss_backward, args)


def test_compiles_fullgraph_and_matches_eager():
    """One small case (Inductor on a CPU is slow): loss and gradients under
    ``torch.compile(fullgraph=True)`` equal the eager path's."""
    torch._dynamo.reset()
    h, w, b, th, tw, tb, _, mask = _inputs((2, 5), 8, 33, torch.float32, seed=18)

    def step(h, w, b):
        return fused_linear_kd_loss(
            h * 1.0, w, teacher_hidden=th, teacher_weight=tw, teacher_bias=tb, student_bias=b,
            temperature=2.0, mask=mask, chunk_rows=4, student_softcap=5.0,
        )  # fmt: skip

    compiled = torch.compile(step, fullgraph=True)(h, w, b)
    got = torch.autograd.grad(compiled, (h, w, b))
    eager = step(h, w, b)
    want = torch.autograd.grad(eager, (h, w, b))
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_compiled_backward_spends_the_accumulators_in_place_and_can_run_twice():
    """Under ``torch.compile`` too the weight and bias gradients are rounded in the fp32
    accumulators' own storage (bf16 gradients in fp32-sized storages: no second weight-sized
    buffer), equal to the eager path's; a second backward through the retained graph
    recomputes the spent buffers and gives the same gradients again."""
    torch._dynamo.reset()
    h, w, b, th, tw, _, _, _ = _inputs((2, 5), 8, 33, torch.bfloat16, seed=41)

    def step(h, w, b):
        return fused_linear_kd_loss(h * 1.0, w, teacher_hidden=th, teacher_weight=tw,
                                    student_bias=b, temperature=2.0, chunk_rows=4)  # fmt: skip

    loss = torch.compile(step, fullgraph=True)(h, w, b)
    first = torch.autograd.grad(loss, (h, w, b), retain_graph=True)
    again = torch.autograd.grad(loss * 0.5, (h, w, b))
    want = torch.autograd.grad(step(h, w, b), (h, w, b))
    for got, twice, ref in zip(first, again, want, strict=True):
        assert got.dtype == ref.dtype == torch.bfloat16 and torch.equal(got, ref)
        assert torch.equal(twice, ref * 0.5)
    assert first[1].untyped_storage().nbytes() == w.numel() * 4  # the accumulator's storage
    assert first[2].untyped_storage().nbytes() == b.numel() * 4
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_a_changing_temperature_compiles_at_most_twice(monkeypatch, backend, reduction):
    """A temperature schedule (a float changing between calls) was guarded by value, as the
    custom ops' float argument: one recompile per value, and past TorchDynamo's
    ``recompile_limit`` (8) a ``fullgraph`` compile raised. Now it is traced as an input (a
    0-d tensor): the frame compiles twice (the first call specialises), and each value gives
    eager's loss and gradients, through the spend op (``batchmean``) and the backward op
    (``none``)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    _use_backend(monkeypatch, backend)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(h, w, b, t, temperature):
        return fused_linear_kd_loss(
            h, w, t, student_bias=b, temperature=temperature, reduction=reduction, chunk_rows=2
        )

    fn = torch.compile(step, fullgraph=True, backend=counter)
    h, w, b, _, _, _, tl, _ = _inputs((5,), 8, 11, torch.float32, seed=70)
    weights = torch.rand(5, generator=_gen(71))  # a per-row grad_output for "none"
    for temperature in (1.0, 0.7, 1.3, 2.0, 3.1, 4.5):
        loss = fn(h, w, b, tl, temperature)
        got = torch.autograd.grad((loss * weights).sum(), (h, w, b))
        want_loss = step(h, w, b, tl, temperature)
        want = torch.autograd.grad((want_loss * weights).sum(), (h, w, b))
        torch.testing.assert_close(loss, want_loss, atol=0, rtol=0)
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y)
    assert counter.frame_count <= 2
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_the_chunk_engine_takes_a_temperature_tensor(monkeypatch, backend):
    """On a GPU the ops keep the compiled call's 0-d temperature on the device (a host read
    would sync): the chunk engine then runs the kernels (or the torch path) and the fp16
    bound with the tensor, and gives the float's loss and gradients."""
    _use_backend(monkeypatch, backend)
    h, w, b, th, tw, tb, _, mask = _inputs((2, 3), 8, 11, torch.float32, seed=72)
    inputs = (h.detach(), w.detach(), b.detach(), None, th, tw, tb, mask)
    heads = (0.5, None, 5.0, None, True, True, True)
    for reduction in ("batchmean", "none"):
        cfg = chunks._Config(0.7, reduction, 2, *heads)
        tensor_cfg = chunks._Config(torch.tensor(0.7, dtype=torch.float64), reduction, 2, *heads)
        want, got = chunks._forward(*inputs, cfg), chunks._forward(*inputs, tensor_cfg)
        if reduction == "none":  # a masked row's stats are not written
            got, want = (*got[:5], got[5][mask.view(-1)]), (*want[:5], want[5][mask.view(-1)])
        for x, y in zip(got, want, strict=True):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    stats = chunks._forward(*inputs, cfg)[5]
    go = torch.rand(2, 3, generator=_gen(73))
    want = chunks._backward_rows(*inputs, stats, go, cfg)
    got = chunks._backward_rows(*inputs, stats, go, tensor_cfg)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
