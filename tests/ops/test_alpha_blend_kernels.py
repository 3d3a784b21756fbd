"""alpha_blend's Triton launchers called directly (through the interpreter on a CPU) against
independent float64 math, every alpha kind and dtype, outputs poisoned; the per-chunk
gradient kernel's row striding and column blocking; alpha views made dense by the launchers;
and the Triton backward through the op against autograd of the reference."""

from __future__ import annotations

import kasmina.kernels.alpha_blend as kernels
import pytest
import torch

from kasmina.ops import alpha_blend, alpha_blend_reference
from tests.ops.alpha_blend_helpers import (
    ALPHA_KINDS,
    SHAPE,
    _alpha,
    _alpha64,
    _alpha_view,
    _blend64,
    _inputs,
)
from tests.ops.tolerances import DTYPES, tol


@pytest.mark.parametrize("kind", ALPHA_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kernel_matches_float64(dtype, kind):
    seed_out, host_out, _ = _inputs(SHAPE, dtype)
    alpha = _alpha(kind, SHAPE[-1])
    out = torch.full_like(seed_out, float("nan"))  # poisoned: an unwritten element fails
    a_t = alpha if isinstance(alpha, torch.Tensor) else None
    a_v = 0.0 if a_t is not None else alpha
    result = kernels.blend_forward(seed_out, host_out, a_t, a_v, out=out)
    assert result is out
    torch.testing.assert_close(out.double(), _blend64(seed_out, host_out, alpha), **tol(dtype))


@pytest.mark.parametrize("kind", ALPHA_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_kernel_matches_float64(dtype, kind):
    seed_out, host_out, grad = _inputs(SHAPE, dtype, seed=1)
    alpha = _alpha(kind, SHAPE[-1], seed=1)
    a_t = alpha if isinstance(alpha, torch.Tensor) else None
    a_v = 0.0 if a_t is not None else alpha
    a64 = _alpha64(alpha, SHAPE[-1])
    poisoned = torch.full_like(grad, float("nan"))
    grad_seed, grad_alpha = kernels.blend_backward(
        grad, seed_out, host_out, a_t, a_v, grad_seed_out=poisoned
    )
    assert grad_seed is poisoned
    torch.testing.assert_close(grad_seed.double(), a64 * grad.double(), **tol(dtype))
    if a_t is None:
        assert grad_alpha.numel() == 0
        return
    prod = grad.double() * (seed_out.double() - host_out.double())
    if a_t.dim() == 0:
        expected = prod.sum()
    else:
        width = SHAPE[-1] // a_t.numel()
        expected = torch.stack(
            [prod[..., k * width : (k + 1) * width].sum() for k in range(a_t.numel())]
        )
    assert grad_alpha.shape == a_t.shape and grad_alpha.dtype == a_t.dtype
    torch.testing.assert_close(grad_alpha.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("shape", "chunks"),
    [((50, 300), 3), ((7, 1100), 4), ((4099,), 1)],
    ids=["row-striding", "several-column-blocks", "one-chunk"],
)
def test_chunked_alpha_gradient_kernel(shape, chunks):
    """The per-chunk gradient kernel's row striding and column blocking (see its launcher)."""
    seed_out, host_out, grad = _inputs(shape, torch.float32, seed=2)
    alpha = torch.rand(chunks, generator=torch.Generator().manual_seed(3))
    grad_seed, grad_alpha = kernels.blend_backward(grad, seed_out, host_out, alpha, 0.0)
    width = shape[-1] // chunks
    prod = (grad.double() * (seed_out.double() - host_out.double())).reshape(-1, chunks, width)
    torch.testing.assert_close(grad_alpha.double(), prod.sum(dim=(0, 2)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_seed.double(), _alpha64(alpha, shape[-1]) * grad.double())


def test_chunk_k_uses_alpha_k(triton_backend):
    """seed=1, host=0: the output is exactly the alpha of each element's chunk."""
    alpha = torch.tensor([0.25, 0.5, 0.75, 1.0])
    out = alpha_blend(torch.ones(3, 8), torch.zeros(3, 8), alpha)
    assert torch.equal(out, alpha.repeat_interleave(2).expand(3, 8))


@pytest.mark.parametrize("kind", ALPHA_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_backward_matches_reference_autograd(
    triton_backend: None,
    poisoned_buffers: None,
    launched: list[str],
    dtype: torch.dtype,
    kind: str,
) -> None:
    """The Triton backward (through the interpreter) against autograd of the reference, run
    in the same dtype (the CPU path's own gradients), and in float64."""
    seed_out, host_out, grad = _inputs((3, 7, 42), dtype, seed=58)
    alpha = _alpha(kind, 42, seed=58)
    a_t = alpha.clone().requires_grad_(True) if isinstance(alpha, torch.Tensor) else alpha
    s = seed_out.clone().requires_grad_(True)
    alpha_blend(s, host_out, a_t).backward(grad)
    backward = "_blend_bwd_chunked_kernel" if kind == "chunks" else "_blend_bwd_kernel"
    assert launched == ["_blend_fwd_kernel", backward]  # the reference below launches none

    s_ref = seed_out.clone().requires_grad_(True)
    a_ref = alpha.clone().requires_grad_(True) if isinstance(alpha, torch.Tensor) else alpha
    alpha_blend_reference(s_ref, host_out, a_ref).backward(grad)
    assert len(launched) == 2
    torch.testing.assert_close(s.grad.double(), s_ref.grad.double(), **tol(dtype))
    if isinstance(alpha, torch.Tensor):
        torch.testing.assert_close(a_t.grad.double(), a_ref.grad.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("view", ["step-2", "offset", "expanded"])
def test_launchers_read_alpha_views_correctly(view: str) -> None:
    """The launchers themselves make a per-chunk alpha view dense (the kernels index it as
    ``alpha_ptr + k``): no stale element, no read past an expanded one-element alpha."""
    seed_out, host_out, grad = _inputs((5, 42), torch.float32, seed=59)
    alpha = _alpha_view(view, 6, seed=60)
    out = kernels.blend_forward(seed_out, host_out, alpha, 0.0, out=torch.full_like(grad, 7.0))
    torch.testing.assert_close(out.double(), _blend64(seed_out, host_out, alpha))
    grad_seed, grad_alpha = kernels.blend_backward(grad, seed_out, host_out, alpha, 0.0)
    prod = (grad.double() * (seed_out.double() - host_out.double())).reshape(5, 6, 7)
    torch.testing.assert_close(grad_alpha.double(), prod.sum(dim=(0, 2)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_seed.double(), _alpha64(alpha, 42) * grad.double())
