"""alpha_blend: Triton kernels (through the interpreter on a CPU) and the torch reference against
independent float64 math, gradients, the incubate contract, and input rejection."""

from __future__ import annotations

import zlib

import kasmina.kernels.alpha_blend as kernels
import pytest
import torch

from kasmina.ops import alpha_blend, alpha_blend_reference
from kasmina.ops.alpha_blend import blend_chunks, blend_chunks_seed_grad
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
        torch.testing.assert_close(alpha.grad.double(), a64.grad, rtol=1e-5, atol=1e-4)


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
        # Past fp32 (the kernel's argument): the CPU path raised torch's overflow error, the
        # kernels returned inf. inf and NaN made NaN outputs on both.
        (torch.zeros(2, 4), torch.zeros(2, 4), 1e39, "blend", "fp32's range"),
        (torch.zeros(2, 4), torch.zeros(2, 4), float("inf"), "blend", "fp32's range"),
        (torch.zeros(2, 4), torch.zeros(2, 4), float("nan"), "blend", "fp32's range"),
        (torch.zeros(2, 4), torch.zeros(2, 4), 10**400, "blend", "fp32's range"),  # OverflowError
        (torch.zeros(2, 4), torch.zeros(2, 4), -(10**39), "blend", "fp32's range"),
    ],
)
def test_rejections(seed_out, host_out, alpha, mode, match):
    if mode not in ("blend", "incubate"):  # the oracle refuses an unknown mode too
        with pytest.raises(ValueError, match=match):
            alpha_blend_reference(seed_out, host_out, alpha, mode)
    with pytest.raises(ValueError, match=match):
        alpha_blend(seed_out, host_out, alpha, mode)


# --------------------------------------------------------------------------- strided inputs


@pytest.fixture
def poisoned_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fresh float buffers start as NaN, so an element the kernels never write cannot pass."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(out: torch.Tensor) -> torch.Tensor:
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def _strided(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Fresh random values of ``shape`` behind a non-contiguous layout."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "transposed":
        return (
            torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen)
            .to(dtype)
            .transpose(-1, -2)
        )
    if kind == "sliced":
        wide = torch.randn(*shape[:-1], 2 * shape[-1] + 3, generator=gen).to(dtype)
        return wide[..., 3::2]
    if kind == "expanded":  # one row broadcast over the leading dims: stride 0
        return torch.randn(shape[-1], generator=gen).to(dtype).expand(shape)
    raise AssertionError(kind)


def _alpha_view(kind: str, chunks: int, seed: int) -> torch.Tensor:
    """A per-chunk alpha as a view: every other element, an offset, or one value expanded."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "step-2":
        return torch.rand(2 * chunks + 1, generator=gen)[1::2]
    if kind == "offset":
        return torch.rand(chunks + 3, generator=gen)[3:]
    return torch.rand(1, generator=gen).expand(chunks)


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
    ("shape", "chunks"), [((1, 1), 1), ((3, 7), 7), ((2, 3, 45), 5), ((9, 15), 3)]
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_random_odd_shapes(
    backend: str,
    poisoned_buffers: None,
    launched: list[str],
    dtype: torch.dtype,
    shape: tuple[int, ...],
    chunks: int,
) -> None:
    """Fresh random values per case (seeded by the case) against independent float64 math."""
    seed = zlib.crc32(repr((shape, chunks, dtype)).encode())
    seed_out, host_out, grad = _inputs(shape, dtype, seed=seed)
    alpha = torch.rand(chunks, generator=torch.Generator().manual_seed(seed))
    out = alpha_blend(seed_out, host_out, alpha)
    torch.testing.assert_close(out.double(), _blend64(seed_out, host_out, alpha), **tol(dtype))
    assert launched == (["_blend_fwd_kernel"] if backend == "triton" else [])


@pytest.mark.parametrize("kind", ["0-d", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_rounds_once(dtype: torch.dtype, kind: str) -> None:
    """The reference's fp16/bf16 branch with a tensor alpha: fp32 math, one rounding, and an
    fp32 alpha that is never rounded to the data's dtype first."""
    seed_out, host_out, _ = _inputs((4, 6, 30), dtype, seed=56)
    alpha = torch.tensor(0.3001) if kind == "0-d" else torch.tensor([0.3001, 0.7, 0.1])
    out = alpha_blend_reference(seed_out, host_out, alpha)
    a = _alpha64(alpha, 30).float()
    expected = (a * seed_out.float() + (1 - a) * host_out.float()).to(dtype)
    assert out.dtype == dtype
    # fp32 math rounded once: within one unit in the last place of the fp32 result's rounding.
    torch.testing.assert_close(out.double(), expected.double(), **tol(dtype))
    torch.testing.assert_close(out.double(), _blend64(seed_out, host_out, alpha), **tol(dtype))


def test_gradcheck_reference_chunked_odd_shape() -> None:
    gen = torch.Generator().manual_seed(57)
    seed_out = torch.randn(2, 3, 15, dtype=torch.float64, generator=gen, requires_grad=True)
    host_out = torch.randn(2, 3, 15, dtype=torch.float64, generator=gen)
    alpha = torch.rand(5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, a: alpha_blend_reference(s.transpose(0, 1), host_out.transpose(0, 1), a),
        (seed_out, alpha),
    )


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


@pytest.mark.parametrize("kind", ["0-d", "chunks"])
@pytest.mark.parametrize("alpha_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_alpha_of_any_float_dtype_blends_data_of_any(
    backend: str,
    poisoned_buffers: None,
    launched: list[str],
    dtype: torch.dtype,
    alpha_dtype: torch.dtype,
    kind: str,
) -> None:
    """alpha's dtype is its own (any of the three): the kernels load it as typed and work in
    fp32, and its gradient comes back in its dtype. Against float64 of the alpha as given."""
    seed = zlib.crc32(repr((dtype, alpha_dtype, kind)).encode())
    seed_out, host_out, grad = _inputs((3, 2, 42), dtype, seed=seed)
    alpha = _alpha(kind, 42, seed=seed).to(alpha_dtype).requires_grad_(True)  # 6 chunks of 7
    s = seed_out.clone().requires_grad_(True)
    out = alpha_blend(s, host_out, alpha)
    out.backward(grad)

    want = _blend64(seed_out, host_out, alpha.detach())
    prod = grad.double() * (seed_out.double() - host_out.double())
    want_alpha = prod.sum() if kind == "0-d" else prod.reshape(3, 2, 6, 7).sum(dim=(0, 1, 3))
    assert out.dtype == dtype and alpha.grad.dtype == alpha_dtype
    torch.testing.assert_close(out.detach().double(), want, **tol(dtype))
    a64 = _alpha64(alpha.detach(), 42)
    torch.testing.assert_close(s.grad.double(), a64 * grad.double(), **tol(dtype))
    torch.testing.assert_close(alpha.grad.double(), want_alpha, **tol(alpha_dtype))
    backward = "_blend_bwd_chunked_kernel" if kind == "chunks" else "_blend_bwd_kernel"
    assert launched == (["_blend_fwd_kernel", backward] if backend == "triton" else [])


@pytest.mark.parametrize("kind", ["float", "0-d", "chunks"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_are_saved_only_when_alpha_needs_a_gradient(
    backend: str, dtype: torch.dtype, kind: str
) -> None:
    """The graph keeps no activation-sized tensor unless alpha requires grad (docs/design.md
    §2), whichever path the call takes (the Function, or lerp's own autograd on the CPU)."""
    seed_out, host_out, grad = _inputs((4, 36), dtype, seed=61)
    for alpha_grad in (False, True):
        if kind == "float" and alpha_grad:
            continue
        alpha = _alpha(kind, 36, seed=61)
        if isinstance(alpha, torch.Tensor):
            alpha.requires_grad_(alpha_grad)
        seed = seed_out.clone().requires_grad_(True)
        saved: list[int] = []

        def pack(t: torch.Tensor, saved: list[int] = saved) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = alpha_blend(seed, host_out, alpha)
        out.backward(grad)
        big = [n for n in saved if n >= seed_out.numel()]
        assert bool(big) == alpha_grad, (alpha_grad, saved)
        torch.testing.assert_close(
            seed.grad.double(), _alpha64(alpha, 36) * grad.double(), **tol(dtype)
        )


# --------------------------------------------------------------------------- higher order


def _penalty(x, w, host, alpha, blend):
    """A gradient penalty: the squared gradients of ``sum(blend(tanh(x @ w), host, alpha)²)``
    for ``x`` (and a tensor ``alpha`` that requires grad), taken with ``create_graph=True``."""
    out = blend(torch.tanh(x @ w), host, alpha)
    wrt = (x, alpha) if isinstance(alpha, torch.Tensor) and alpha.requires_grad else (x,)
    grads = torch.autograd.grad(out.pow(2).sum(), wrt, create_graph=True)
    return sum(g.pow(2).sum() for g in grads)


@pytest.mark.parametrize(
    ("kind", "alpha_grad"),
    [("float", False), ("0-d", False), ("0-d", True), ("chunks", False), ("chunks", True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("call", ["public", "custom-op"])
def test_gradient_penalty_matches_float64_autograd(
    backend: str, call: str, dtype: torch.dtype, kind: str, alpha_grad: bool
) -> None:
    """A second backward through the op's backward (docs/design.md §6a: a gradient penalty
    through guarded seeds) against float64 autograd of the plain blend, eager and through the
    custom op torch.compile uses (called eagerly): the kernels record no graph, so under
    ``create_graph=True`` the backward is differentiable torch ops. (fp16 data with a tensor
    alpha takes the Function on the CPU path too; bf16's own rounding of the matmul and tanh
    around the op is above any tolerance that would still catch a missing term.)"""
    gen = torch.Generator().manual_seed(62)
    x0 = torch.randn(4, 6, generator=gen).to(dtype)
    w0 = (torch.randn(6, 12, generator=gen) * 0.5).to(dtype)
    host0 = torch.randn(4, 12, generator=gen).to(dtype)
    alpha0 = _alpha(kind, 12, seed=62)

    def leaves(dt):
        x, w = (t.detach().to(dt).requires_grad_(True) for t in (x0, w0))
        a = alpha0
        if isinstance(a, torch.Tensor):
            a = a.detach().to(dt if dt == torch.float64 else a.dtype).requires_grad_(alpha_grad)
        return x, w, a

    x, w, a = leaves(dtype)
    host = host0.clone().requires_grad_(True)  # gets no gradient, at any order

    def op(seed, h, alpha):
        if isinstance(alpha, torch.Tensor):
            return torch.ops.kasmina.alpha_blend(seed, h, alpha, 0.0, "blend")
        return torch.ops.kasmina.alpha_blend(seed, h, None, alpha, "blend")

    _penalty(x, w, host, a, alpha_blend if call == "public" else op).backward()

    x64, w64, a64 = leaves(torch.float64)

    def blend64(seed, h, alpha):
        col = _alpha64(alpha, seed.shape[-1])
        return col * seed + (1 - col) * h.detach()

    _penalty(x64, w64, host0.double(), a64, blend64).backward()
    assert host.grad is None
    got = [x.grad, w.grad, *([a.grad] if alpha_grad else [])]
    want = [x64.grad, w64.grad, *([a64.grad] if alpha_grad else [])]
    for g, e in zip(got, want, strict=True):
        assert g is not None and g.shape == e.shape
        t = tol(dtype)
        torch.testing.assert_close(g.double(), e, rtol=t["rtol"], atol=t["atol"] * e.abs().max())


def test_blend_chunks_seed_grad_is_differentiable_in_grad_mode(backend: str) -> None:
    """The seeds' guarded graft forms its seeds' gradient with ``blend_chunks_seed_grad``:
    inside a backward under ``create_graph=True`` (grad mode on) it is differentiable in the
    incoming gradient and in alpha, with the value it has without a graph."""
    gen = torch.Generator().manual_seed(63)
    grad = torch.randn(3, 4, 5, generator=gen, requires_grad=True)
    alpha = torch.rand(4, generator=gen, requires_grad=True)
    weights = torch.randn(3, 4, 5, generator=gen)
    with torch.no_grad():
        plain = blend_chunks_seed_grad(grad, alpha)
    out = blend_chunks_seed_grad(grad, alpha)
    assert torch.equal(out, plain)
    (out * weights).sum().backward()
    torch.testing.assert_close(grad.grad, alpha.detach()[:, None] * weights)
    torch.testing.assert_close(alpha.grad, (weights * grad.detach()).sum(dim=(0, 2)))


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


@pytest.mark.parametrize("alpha_kind", ALPHA_KINDS)
def test_a_host_needing_grad_alone_makes_no_graph(backend, alpha_kind):
    """blend detaches the host: a host that requires grad, with a seed and alpha that do not,
    gives an output without grad (as the reference's), eager and compiled; incubate passes
    the host's gradient through, so there it does."""
    seed_out, host_out, _ = _inputs((2, 8), torch.float32)
    host_out.requires_grad_()
    alpha = _alpha(alpha_kind, 8)
    assert not alpha_blend_reference(seed_out, host_out, alpha).requires_grad
    assert not alpha_blend(seed_out, host_out, alpha).requires_grad
    torch._dynamo.reset()
    compiled = torch.compile(alpha_blend, fullgraph=True, backend="aot_eager")
    assert not compiled(seed_out, host_out, alpha).requires_grad
    torch._dynamo.reset()
    assert alpha_blend(seed_out, host_out, alpha, mode="incubate").requires_grad


@pytest.mark.parametrize("alpha_kind", ALPHA_KINDS)
@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_torch_func_grad_matches_eager_autograd(backend, alpha_kind, mode):
    """``torch.func.grad`` over the seed, the host and a tensor alpha equals eager autograd
    (the float64 reference's) on both backends; ``vmap`` raises naming the op."""
    seed_out, host_out, grad = _inputs((2, 3, 8), torch.float32, seed=7)
    alpha = _alpha(alpha_kind, 8)
    a = alpha if isinstance(alpha, float) else alpha.clone()

    def f(s, h, al):
        return (alpha_blend(s, h, al if al is not None else a, mode) * grad).sum()

    tensor_alpha = not isinstance(alpha, float)
    argnums = (0, 1, 2) if tensor_alpha else (0, 1)
    got = torch.func.grad(f, argnums=argnums)(seed_out, host_out, a if tensor_alpha else None)
    leaves = [x.double().requires_grad_() for x in (seed_out, host_out)]
    if tensor_alpha:
        leaves.append(a.double().requires_grad_())
    al64 = leaves[2] if tensor_alpha else alpha
    out = alpha_blend_reference(leaves[0], leaves[1], al64, mode)
    want = torch.autograd.grad((out * grad.double()).sum(), leaves, allow_unused=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), torch.zeros_like(g.double()) if w is None else w)
    with pytest.raises(RuntimeError, match="alpha_blend does not support torch.vmap"):
        torch.vmap(lambda s, h: alpha_blend(s, h, 0.3, mode))(seed_out, host_out)


@pytest.mark.parametrize("alpha_kind", ["float", "chunks"])
@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_a_compiled_torch_func_grad_matches_eager(alpha_kind, mode):
    """Inside ``torch.compile`` of a ``torch.func`` transform neither the custom op (it has no
    ``torch.func`` rule: TorchDynamo raised) nor an ``autograd.Function`` serves (traced over
    ``incubate``'s straight-through Function, the transform gave the seed a zero gradient):
    plain torch ops there, the eager gradients and, for ``incubate``, exactly the host's value."""
    seed_out, host_out, grad = _inputs((2, 3, 8), torch.float32, seed=9)
    alpha = _alpha(alpha_kind, 8)

    def f(s, h):
        out = alpha_blend(s, h, alpha, mode)
        return (out * grad).sum(), out

    want, want_out = torch.func.grad(f, argnums=(0, 1), has_aux=True)(seed_out, host_out)
    torch._dynamo.reset()
    transform = torch.func.grad(f, argnums=(0, 1), has_aux=True)
    compiled = torch.compile(transform, fullgraph=True, backend="aot_eager")
    got, out = compiled(seed_out, host_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert bool(got[0].any())  # the seed's gradient is there
    torch.testing.assert_close(out, want_out)
    if mode == "incubate":  # exactly the host's value, a non-finite seed element's too
        assert torch.equal(out, host_out)
        seed_out[0, 0, :2] = torch.tensor([float("inf"), float("nan")])
        assert torch.equal(compiled(seed_out, host_out)[1], host_out)
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_jacrev_and_nested_grad_equal_the_float64_reference(backend, mode) -> None:
    """The blend's backward is linear in the incoming gradient, in plain torch ops under a
    transform, so reverse mode composes: ``jacrev`` (``vmap`` over the backward: the op's own
    ``vmap`` refusal is for batched primals) and ``grad`` of ``grad``, over the seed, the host
    and a per-chunk alpha, equal the float64 reference's (the docs said they raised)."""
    gen = torch.Generator().manual_seed(31)
    seed, host = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    alpha = torch.rand(3, generator=gen)

    def op(s, h, a):
        return alpha_blend(s, h, a, mode)

    def ref(s, h, a):
        return alpha_blend_reference(s, h, a, mode)

    got = torch.func.jacrev(op, argnums=(0, 1, 2))(seed, host, alpha)
    want = torch.func.jacrev(ref, argnums=(0, 1, 2))(seed.double(), host.double(), alpha.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)

    def second(fn, s, h, a):  # d/d(alpha, seed) of the seed gradient of sum(out^2)
        inner = lambda s_, a_: torch.func.grad(lambda x: (fn(x, h, a_) ** 2).sum())(s_)  # noqa: E731
        return torch.func.grad(lambda s_, a_: inner(s_, a_).sum(), argnums=(0, 1))(s, a)

    got = second(op, seed, host, alpha)
    want = second(ref, seed.double(), host.double(), alpha.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)


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


def _tangent64(seed, host, alpha, mode, t_seed, t_host, t_alpha):
    """``torch.func.jvp`` of the float64 reference: the independent forward-mode oracle."""
    if isinstance(alpha, torch.Tensor):
        fn = lambda s, h, a: alpha_blend_reference(s, h, a, mode)  # noqa: E731
        args, tans = (seed, host, alpha), (t_seed, t_host, t_alpha)
    else:
        fn = lambda s, h: alpha_blend_reference(s, h, alpha, mode)  # noqa: E731
        args, tans = (seed, host), (t_seed, t_host)
    return torch.func.jvp(fn, tuple(a.double() for a in args), tuple(t.double() for t in tans))


@pytest.mark.parametrize("mode", ["blend", "incubate"])
@pytest.mark.parametrize("alpha_kind", ALPHA_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_mode_matches_the_float64_reference(backend, dtype, alpha_kind, mode) -> None:
    """Forward-mode AD was refused (``NotImplementedError``, a deliberate stub). Now
    ``torch.func.jvp`` and ``forward_ad`` (a dual seed with and without grad, which once
    skipped the Function and dropped the tangent) give the reference's float64 tangent:
    ``alpha*t_seed + t_alpha*(seed - host)`` per chunk for ``blend`` (the host's tangent adds
    nothing: it is detached), ``t_seed + t_host`` for ``incubate``."""
    import torch.autograd.forward_ad as fwad

    shape = (3, 7, 18)  # odd, and 18 divides into the 6 chunks of a per-chunk alpha
    seed, host, _ = _inputs(shape, dtype, seed=zlib.crc32(f"{dtype}{alpha_kind}{mode}".encode()))
    t_seed, t_host, _ = _inputs(shape, dtype, seed=7)
    alpha = _alpha(alpha_kind, shape[-1], seed=3)
    t_alpha = torch.randn_like(alpha) if isinstance(alpha, torch.Tensor) else None
    want_out, want = _tangent64(seed, host, alpha, mode, t_seed, t_host, t_alpha)
    if t_alpha is None:
        got_out, got = torch.func.jvp(
            lambda s, h: alpha_blend(s, h, alpha, mode), (seed, host), (t_seed, t_host)
        )
    else:
        got_out, got = torch.func.jvp(
            lambda s, h, a: alpha_blend(s, h, a, mode),
            (seed, host, alpha),
            (t_seed, t_host, t_alpha),
        )
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **tol(dtype))
    torch.testing.assert_close(got_out.double(), want_out, **tol(dtype))
    for requires_grad in (False, True):
        with fwad.dual_level():
            dual_seed = fwad.make_dual(seed.clone().requires_grad_(requires_grad), t_seed)
            dual_host = fwad.make_dual(host, t_host)
            a = alpha if t_alpha is None else fwad.make_dual(alpha, t_alpha)
            tangent = fwad.unpack_dual(alpha_blend(dual_seed, dual_host, a, mode)).tangent
        assert tangent is not None, requires_grad
        torch.testing.assert_close(tangent.double(), want, **tol(dtype))


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_jacfwd_equals_jacrev_on_small_inputs(backend, mode) -> None:
    """``jacfwd`` (``vmap`` over ``jvp``: the primals are not batched, so the op's ``vmap``
    refusal is not reached) equals autograd's reverse-mode Jacobian, for every input."""
    seed, host = torch.randn(2, 6), torch.randn(2, 6)
    alpha = torch.tensor([0.2, 0.7, 0.4])
    fn = lambda s, h, a: alpha_blend(s, h, a, mode)  # noqa: E731
    fwd = torch.func.jacfwd(fn, argnums=(0, 1, 2))(seed, host, alpha)
    rev = torch.autograd.functional.jacobian(fn, (seed, host, alpha))
    for f, r in zip(fwd, rev, strict=True):
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["blend", "incubate"])
def test_nested_forward_mode_raises_naming_the_op(backend, mode) -> None:
    """PyTorch runs a Function's ``jvp`` rule below outer transforms without differentiating
    it, so ``jvp`` of ``jvp`` and ``jacfwd(jacfwd)`` returned silently wrong second-order terms
    (0 where ``alpha*tanh''`` belongs; refused with ``NotImplementedError`` before the op had
    a rule). Now they raise naming the op (and the reference's ``incubate``, for its own
    Function's rule), while reverse over one forward level (``grad`` of
    ``jvp`` and eager ``forward_ad`` then ``autograd.grad``: the rule is linear in the saved
    tensors, so its torch ops are differentiated exactly) matches the float64 reference."""
    import torch.autograd.forward_ad as fwad

    seed, host, v = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6)
    alpha, t_alpha = torch.tensor([0.2, 0.7, 0.4]), torch.randn(3)

    def op(s, a):
        return alpha_blend(torch.tanh(s), host, a, mode).square().sum()

    def ref(s, a):
        return alpha_blend_reference(torch.tanh(s), host.double(), a, mode).square().sum()

    def jvp_of(fn):
        return lambda s, a: torch.func.jvp(fn, (s, a), (v.to(s.dtype), t_alpha.to(a.dtype)))[1]

    with pytest.raises(RuntimeError, match="alpha_blend supports a single forward-mode"):
        torch.func.jvp(jvp_of(op), (seed, alpha), (v, t_alpha))
    with pytest.raises(RuntimeError, match="alpha_blend supports a single forward-mode"):
        torch.func.jacfwd(torch.func.jacfwd(op))(seed, alpha)
    if mode == "incubate":  # the reference's straight-through Function has a rule of its own
        with pytest.raises(RuntimeError, match="alpha_blend_reference supports a single"):
            torch.func.jacfwd(torch.func.jacfwd(ref))(seed.double(), alpha.double())
    got = torch.func.grad(jvp_of(op), argnums=(0, 1))(seed, alpha)
    want = torch.func.grad(jvp_of(ref), argnums=(0, 1))(seed.double(), alpha.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    s, a = seed.clone().requires_grad_(), alpha.clone().requires_grad_()
    with fwad.dual_level():
        tangent = fwad.unpack_dual(op(fwad.make_dual(s, v), fwad.make_dual(a, t_alpha))).tangent
    got = torch.autograd.grad(tangent, (s, a), allow_unused=True, materialize_grads=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(), (2,)])
def test_an_alpha_or_host_made_under_inference_mode_is_accepted(backend, shape):
    """An alpha made under ``torch.inference_mode()`` (a schedule computed there) and a seed
    that trains: the kernel path saved the inference tensor and raised "Inference tensors
    cannot be saved for backward" (the CPU path read a 0-d alpha as a float and passed). The
    saved alpha (and seed and host, when alpha trains) is copied out of inference mode."""
    seed, host, grad = _inputs((3, 6), torch.float32, seed=17)
    with torch.inference_mode():
        alpha = torch.full(shape, 0.3)
        frozen_host = host.clone()
    s = seed.clone().requires_grad_(True)
    alpha_blend(s, frozen_host, alpha).backward(grad)
    torch.testing.assert_close(s.grad, grad * 0.3)
    a = alpha.clone().requires_grad_(True)
    s.grad = None
    alpha_blend(s, frozen_host, a).backward(grad)
    a64 = a.detach().double().requires_grad_(True)
    alpha_blend_reference(seed.double(), host.double(), a64).backward(grad.double())
    torch.testing.assert_close(s.grad, grad * 0.3)
    torch.testing.assert_close(a.grad, a64.grad.float())
