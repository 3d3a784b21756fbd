"""alpha_blend: Triton kernels (through the interpreter on a CPU) and the torch reference against
independent float64 math, gradients, the incubate contract, and input rejection."""

from __future__ import annotations

import kasmina.kernels.alpha_blend as kernels
import pytest
import torch

from kasmina.ops import alpha_blend, alpha_blend_reference
from tests.ops.tolerances import DTYPES, tol

# Not multiples of the 4096-element block, and a last dim divisible by the chunk counts used.
SHAPE = (3, 5, 420)
ALPHA_KINDS = ("float", "0-d", "chunks")


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("KASMINA_BACKEND", request.param)
    return request.param


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seed_out = torch.randn(shape, generator=gen).to(dtype)
    host_out = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    return seed_out, host_out, grad


def _alpha(kind: str, last_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 100)
    if kind == "float":
        return 0.3125
    if kind == "0-d":
        return torch.rand((), generator=gen)
    chunks = 6 if last_dim % 6 == 0 else 1
    return torch.rand(chunks, generator=gen)


def _alpha64(alpha, last_dim: int) -> torch.Tensor:
    """Independent per-column expansion: column j belongs to chunk j // (D // C)."""
    if not isinstance(alpha, torch.Tensor):
        return torch.tensor(alpha, dtype=torch.float64)
    a = alpha.double()
    if a.dim() == 0:
        return a
    width = last_dim // a.numel()
    return torch.stack([a[j // width] for j in range(last_dim)])


def _blend64(seed_out, host_out, alpha) -> torch.Tensor:
    a = _alpha64(alpha, seed_out.shape[-1])
    return a * seed_out.double() + (1 - a) * host_out.double()


# --------------------------------------------------------------------------- kernels


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


def test_launchers_reject_non_contiguous():
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.blend_forward(x.t(), x.t().contiguous(), None, 0.5)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.blend_backward(x.t(), None, None, None, 0.5)


# --------------------------------------------------------------------------- op + autograd


@pytest.mark.parametrize("kind", ALPHA_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_gradients_match_reference_autograd(backend, dtype, kind):
    """Values and gradients of the op (both paths) against autograd of the reference in f64."""
    seed_out, host_out, grad = _inputs((2, 3, 36), dtype, seed=4)
    alpha = _alpha(kind, 36, seed=4)
    seed_out.requires_grad_(True)
    host_out.requires_grad_(True)
    if isinstance(alpha, torch.Tensor):
        alpha.requires_grad_(True)
    out = alpha_blend(seed_out, host_out, alpha, "blend")
    out.backward(grad)

    s64 = seed_out.detach().double().requires_grad_(True)
    h64 = host_out.detach().double()
    a64 = alpha.detach().double().requires_grad_(True) if isinstance(alpha, torch.Tensor) else alpha
    ref = alpha_blend_reference(s64, h64, a64, "blend")
    ref.backward(grad.double())

    assert out.dtype == dtype
    torch.testing.assert_close(out.detach().double(), ref.detach(), **tol(dtype))
    torch.testing.assert_close(seed_out.grad.double(), s64.grad, **tol(dtype))
    assert host_out.grad is None
    if isinstance(alpha, torch.Tensor):
        assert alpha.grad.shape == alpha.shape
        torch.testing.assert_close(alpha.grad.double(), a64.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_custom_op_matches_eager_function(backend, mode):
    """The custom op torch.compile uses (called eagerly here) against the eager path."""
    seed_out, host_out, grad = _inputs((3, 24), torch.float32, seed=11)
    results = []
    for call in ("public", "custom-op"):
        s, h = seed_out.clone().requires_grad_(True), host_out.clone().requires_grad_(True)
        alpha = torch.rand(4, generator=torch.Generator().manual_seed(12)).requires_grad_(True)
        if call == "public":
            out = alpha_blend(s, h, alpha, mode)
        else:
            out = torch.ops.kasmina.alpha_blend(s, h, alpha, 0.0, mode)
        out.backward(grad)
        results.append((out.detach(), s.grad, h.grad, alpha.grad))
    for eager, op in zip(*results, strict=True):
        if eager is None:
            assert op is None
        else:
            torch.testing.assert_close(op, eager, rtol=1e-6, atol=1e-6)


def test_seed_grad_is_alpha_times_g_and_host_grad_stays_none(backend):
    seed_out, host_out, grad = _inputs((4, 33), torch.float32, seed=5)
    seed_out.requires_grad_(True)
    host_out.requires_grad_(True)
    alpha = torch.tensor(0.37)  # no grad: seed/host need not be saved, alpha.grad stays None
    alpha_blend(seed_out, host_out, alpha).backward(grad)
    assert torch.equal(seed_out.grad, alpha * grad)  # one fp32 multiply either way
    assert host_out.grad is None
    assert alpha.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_incubate_is_exactly_the_seedless_graph(backend, dtype):
    """Value bit-identical to host; host grad bit-identical to the graph without the seed."""
    seed_out, host_out, _ = _inputs((3, 50), dtype, seed=6)
    host_out[0, 0] = -0.0
    weight = torch.randn(3, 50).to(dtype)

    host_a = host_out.clone().requires_grad_(True)
    seed_a = seed_out.clone().requires_grad_(True)
    out = alpha_blend(seed_a, host_a, 0.3, mode="incubate")
    assert torch.equal(out.view(torch.int16), host_out.view(torch.int16))  # bits, incl. -0.0
    (out.sin() * weight).sum().backward()

    host_b = host_out.clone().requires_grad_(True)
    (host_b.sin() * weight).sum().backward()
    assert torch.equal(host_a.grad.view(torch.int16), host_b.grad.view(torch.int16))
    assert torch.equal(seed_a.grad.view(torch.int16), host_b.grad.view(torch.int16))


def test_incubate_gives_alpha_no_gradient(backend):
    seed_out, host_out, grad = _inputs((2, 8), torch.float32, seed=7)
    alpha = torch.tensor(0.5, requires_grad=True)
    seed_out.requires_grad_(True)
    alpha_blend(seed_out, host_out, alpha, mode="incubate").backward(grad)
    assert alpha.grad is None
    assert torch.equal(seed_out.grad, grad)


def test_gradcheck_reference_float64():
    gen = torch.Generator().manual_seed(8)
    seed_out = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    host_out = torch.randn(3, 8, dtype=torch.float64, generator=gen)  # receives no gradient
    for alpha in (
        torch.rand((), dtype=torch.float64, generator=gen, requires_grad=True),
        torch.rand(4, dtype=torch.float64, generator=gen, requires_grad=True),
    ):
        assert torch.autograd.gradcheck(
            lambda s, a: alpha_blend_reference(s, host_out, a), (seed_out, alpha)
        )
    assert torch.autograd.gradcheck(lambda s: alpha_blend_reference(s, host_out, 0.7), (seed_out,))


def test_non_contiguous_inputs_are_made_contiguous(backend):
    seed_out, host_out, _ = _inputs((12, 10), torch.float32, seed=9)
    expected = alpha_blend(seed_out.t().contiguous(), host_out.t().contiguous(), 0.4)
    torch.testing.assert_close(alpha_blend(seed_out.t(), host_out.t(), 0.4), expected)


def test_empty_tensors(backend):
    empty = torch.empty(0, 6)
    alpha = torch.rand(3, requires_grad=True)
    seed_out = empty.clone().requires_grad_(True)
    out = alpha_blend(seed_out, empty, alpha)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert torch.equal(alpha.grad, torch.zeros(3))


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("seed_out", "host_out", "alpha", "mode", "match"),
    [
        (torch.zeros(2, 4), torch.zeros(2, 4), 0.5, "mix", "mode"),
        (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4), 0.5, "blend", "float32"),
        (torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 4), 0.5, "blend", "float32"),
        (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.float16), 0.5, "blend", "share"),
        (torch.zeros(2, 4), torch.zeros(2, 5), 0.5, "blend", "same shape"),
        (torch.zeros(2, 4), torch.zeros(2, 4, device="meta"), 0.5, "blend", "meta"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 2), "blend", "0-d or 1-d"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(3), "blend", "divide"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(0), "blend", "divide"),
        (torch.zeros(()), torch.zeros(()), torch.zeros(1), "blend", "at least one dim"),
        (torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros((), device="meta"), "blend", "meta"),
        (
            torch.zeros(2, 4),
            torch.zeros(2, 4),
            torch.zeros((), dtype=torch.int64),
            "blend",
            "alpha",
        ),
        (torch.zeros(2, 4), torch.zeros(2, 4), True, "blend", "alpha"),
        (torch.zeros(2, 4), torch.zeros(2, 4), "0.5", "blend", "alpha"),
        ([0.0], torch.zeros(1), 0.5, "blend", "seed_out"),
    ],
)
def test_rejections(seed_out, host_out, alpha, mode, match):
    with pytest.raises(ValueError, match=match):
        alpha_blend(seed_out, host_out, alpha, mode)
