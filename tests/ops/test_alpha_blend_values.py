"""alpha_blend's values and gradients on both backends against the torch reference and
independent float64 math: every alpha kind and dtype (alpha's own dtype too), the custom op
against the eager path, the incubate contract (bit-identical to the seedless graph, no alpha
gradient), gradcheck of the reference, fresh random odd shapes, empty tensors, the
reference's single rounding in low precision, what the graph saves, a host that alone needs
grad, and inputs made under inference mode."""

from __future__ import annotations

import zlib

import pytest
import torch

from kasmina.ops import alpha_blend, alpha_blend_reference
from tests.ops.alpha_blend_helpers import ALPHA_KINDS, _alpha, _alpha64, _blend64, _inputs
from tests.ops.tolerances import DTYPES, tol


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


def test_empty_tensors(backend):
    empty = torch.empty(0, 6)
    alpha = torch.rand(3, requires_grad=True)
    seed_out = empty.clone().requires_grad_(True)
    out = alpha_blend(seed_out, empty, alpha)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert torch.equal(alpha.grad, torch.zeros(3))


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
