"""alpha_blend on non-contiguous inputs, on both backends: transposed, sliced and expanded
seed and host with per-chunk alpha views, against float64; an output the caller may modify in
place; ``blend_chunks``'s result not a view and laid out like its seed; the custom ops on
strides other than the traced ones; and a compiled channels_last blend."""

from __future__ import annotations

import pytest
import torch

from kasmina.ops import alpha_blend, alpha_blend_reference
from kasmina.ops.alpha_blend import blend_chunks
from tests.ops.alpha_blend_helpers import _alpha, _alpha64, _alpha_view, _blend64, _inputs, _strided
from tests.ops.tolerances import DTYPES, tol


def test_non_contiguous_inputs_are_made_contiguous(backend):
    seed_out, host_out, _ = _inputs((12, 10), torch.float32, seed=9)
    expected = alpha_blend(seed_out.t().contiguous(), host_out.t().contiguous(), 0.4)
    torch.testing.assert_close(alpha_blend(seed_out.t(), host_out.t(), 0.4), expected)


@pytest.mark.parametrize("alpha_kind", ["float", "0-d-view", "step-2", "offset", "expanded"])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_alpha_views(
    backend: str,
    poisoned_buffers: None,
    launched: list[str],
    dtype: torch.dtype,
    layout: str,
    alpha_kind: str,
) -> None:
    """Odd shapes, non-contiguous seed/host, per-chunk alpha views: values and every gradient
    against autograd of the float64 reference."""
    shape, chunks = (3, 5, 35), 7
    seed_out = _strided(layout, shape, dtype, seed=51).requires_grad_(True)
    host_out = _strided("transposed" if layout != "transposed" else "sliced", shape, dtype, 52)
    grad = _strided("sliced", shape, dtype, seed=53)
    if alpha_kind == "float":
        alpha: torch.Tensor | float = 0.6875
    elif alpha_kind == "0-d-view":
        alpha = torch.rand(4, generator=torch.Generator().manual_seed(54))[2]
    else:
        alpha = _alpha_view(alpha_kind, chunks, seed=55)
    if isinstance(alpha, torch.Tensor):
        alpha.requires_grad_(True)

    out = alpha_blend(seed_out, host_out, alpha)
    out.backward(grad)

    s64 = seed_out.detach().double().requires_grad_(True)
    a64 = alpha.detach().double().requires_grad_(True) if isinstance(alpha, torch.Tensor) else alpha
    ref = alpha_blend_reference(s64, host_out.detach().double(), a64)
    ref.backward(grad.double())
    assert out.dtype == dtype and out.shape == shape
    torch.testing.assert_close(out.detach().double(), ref.detach(), **tol(dtype))
    # An expanded seed accumulates its gradient over the broadcast rows.
    torch.testing.assert_close(seed_out.grad.double(), s64.grad, **tol(dtype))
    if isinstance(alpha, torch.Tensor):
        assert alpha.grad.shape == alpha.shape
        torch.testing.assert_close(alpha.grad.double(), a64.grad, rtol=1e-5, atol=1e-4)
    # The kernels ran (a forward and a backward) on the Triton backend, none on the reference.
    assert {"_blend_fwd_kernel"} < set(launched) if backend == "triton" else not launched


@pytest.mark.parametrize(
    ("kind", "alpha_grad"),
    [("float", False), ("0-d", False), ("0-d", True), ("chunks", False), ("chunks", True)],
    ids=["float", "0-d", "0-d trained", "chunks", "chunks trained"],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_output_may_be_modified_in_place(
    backend: str, dtype: torch.dtype, kind: str, alpha_grad: bool
) -> None:
    """The op's output is the caller's to modify in place (a ``relu_``, as an
    ``nn.ReLU(inplace=True)`` after a slot does), with the values and gradients of the same
    computation done out of place. Autograd forbids that on a
    custom Function's output that is a view of one of its temporaries, which a per-chunk
    blend flattened from ``[..., C, W]`` was."""
    seed_out, host_out, grad = _inputs((2, 3, 36), dtype, seed=21)
    alpha = _alpha(kind, 36, seed=21)
    results = []
    for inplace in (True, False):
        s = seed_out.clone().requires_grad_(True)
        a = alpha.clone().requires_grad_(alpha_grad) if isinstance(alpha, torch.Tensor) else alpha
        out = alpha_blend(s, host_out, a)
        out = out.relu_() if inplace else torch.relu(out)
        out.backward(grad)
        results.append((out.detach(), s.grad, a.grad if alpha_grad else None))
    for got, want in zip(*results, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64])
@pytest.mark.parametrize("moved", [False, True], ids=["last dim", "moved chunk dim"])
def test_blend_chunks_returns_a_tensor_that_is_not_a_view(
    backend: str, dtype: torch.dtype, moved: bool
) -> None:
    """``blend_chunks`` gives the per-chunk blend as a tensor that is not a view (the seeds'
    guarded graft returns it from its autograd node, and the caller may modify it in place):
    on the CPU reference path for fp32/fp64, its scratch ``seed`` buffer itself, overwritten
    in place (no new buffer; a chunk dim moved last keeps the memory order it had); else a
    new tensor, or, for a moved chunk dim, ``seed`` with the result copied in (the slot's
    output keeps its host's layout on every path)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the kernels take fp32, fp16 and bf16")
    gen = torch.Generator().manual_seed(31)
    seed, host = (torch.randn(2, 6, 4, 6, generator=gen).to(dtype) for _ in range(2))
    if moved:  # a conv's channels as the chunk dim, moved last, as the graft does
        seed, host = (
            seed.movedim(1, -1).clone(memory_format=torch.preserve_format),
            host.movedim(1, -1),
        )
    alpha = torch.rand(3, generator=gen)
    want = alpha_blend_reference(seed, host, alpha)
    strides = seed.stride()
    out = blend_chunks(seed, host, alpha)
    assert out._base is None and out.shape == host.shape and out.dtype == dtype
    # The memory order of ``seed`` on every path: a moved chunk dim's result is written into
    # ``seed`` when the path computes it in a contiguous buffer of its own.
    assert out.stride() == strides
    in_place = backend == "reference" and dtype in (torch.float32, torch.float64)
    assert (out is seed) == (in_place or moved)
    if backend == "reference":
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, want, **tol(dtype))


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_the_custom_ops_take_inputs_of_any_strides(backend: str, mode: str) -> None:
    """Compiled, the op's inputs can have other strides than the ones traced (below): its own
    implementation makes them contiguous, forward and backward, against float64."""
    seed_out, host_out, grad = _inputs((5, 6, 4), torch.float32, seed=21)
    alpha = torch.rand(2, generator=torch.Generator().manual_seed(22))
    s, h = seed_out.transpose(0, 1), host_out.transpose(0, 1)  # [6, 5, 4], not contiguous
    assert not s.is_contiguous()
    out = torch.ops.kasmina.alpha_blend(s, h, alpha, 0.0, mode)
    want = _blend64(s, h, alpha) if mode == "blend" else h.double()
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    g = grad.transpose(0, 1)
    grad_seed, grad_alpha = torch.ops.kasmina.alpha_blend_backward(g, s, h, alpha, 0.0)
    torch.testing.assert_close(
        grad_seed.double(), _alpha64(alpha, 4) * g.double(), rtol=1e-6, atol=1e-6
    )
    per_column = (g.double() * (s.double() - h.double())).sum(dim=(0, 1))
    torch.testing.assert_close(
        grad_alpha.double(), per_column.view(2, 2).sum(1), rtol=1e-5, atol=1e-5
    )


def test_a_channels_last_blend_of_one_channel_chunks_compiles(backend: str) -> None:
    """A channels_last conv slot's pre-blend, built of 1-channel chunks and moved to the last
    dim, is contiguous as AOTAutograd's fake tensor and not as the real one: the public op's
    ``.contiguous()``, traced as a no-op, handed the kernel a strided tensor (ValueError)."""

    def blend(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        a, b = x.split(1, dim=1)
        pre = torch.cat([torch.tanh(a * w), b], dim=1)
        return alpha_blend(pre.movedim(1, -1), x.movedim(1, -1), alpha)

    torch._dynamo.reset()
    x = torch.randn(2, 2, 5, 5).to(memory_format=torch.channels_last)
    w, alpha = torch.tensor(0.7, requires_grad=True), torch.tensor([0.3, 1.0])
    got = torch.compile(blend, backend="aot_eager", fullgraph=True)(x, w, alpha)
    x64 = x.double().movedim(1, -1)
    pre64 = torch.stack([torch.tanh(x64[..., 0] * 0.7), x64[..., 1]], dim=-1)
    torch.testing.assert_close(got.double(), _blend64(pre64, x64, alpha), rtol=1e-6, atol=1e-6)
    got.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad)
