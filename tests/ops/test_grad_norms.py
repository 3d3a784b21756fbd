"""grad_norms / leak_check: Triton path (interpreter on CPU) and reference vs float64 norms."""

from __future__ import annotations

import math
import operator
from collections import OrderedDict

import kasmina.kernels.grad_norms as gn_kernels
import numpy as np
import pytest
import torch

from kasmina.ops import grad_norms, grad_norms_reference, leak_check, leak_check_reference
from tests.ops.tolerances import DTYPES, tol

FP32 = tol(torch.float32)  # accumulation is fp32 whatever the input dtype
KERNELS = {"_sumsq_kernel", "_finish_kernel"}


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``torch.empty`` return garbage so that an unwritten output cannot pass.

    -1 is never a valid norm nor a valid partial sum of squares.
    """
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.dtype.is_floating_point:
            out.fill_(-1.0)
        return out

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def fresh_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Empty launch and plan caches for this test (other tests' entries cannot interfere)."""
    monkeypatch.setattr(gn_kernels, "_launches", OrderedDict())
    monkeypatch.setattr(gn_kernels, "_plans", OrderedDict())


@pytest.fixture(params=["triton_backend", "reference_backend"])
def any_backend(request: pytest.FixtureRequest) -> str:
    request.getfixturevalue(request.param)
    return request.param


def oracle(tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """float64 norms computed independently of the op."""
    out = []
    for t in tensors:
        if t is None or t.numel() == 0:
            out.append(0.0)
        else:
            out.append(math.sqrt(t.detach().double().pow(2).sum().item()))
    return torch.tensor(out, dtype=torch.float64)


def mixed_tensors(count: int, seed: int) -> list[torch.Tensor | None]:
    """Mixed sizes (empty, tiny, not block multiples, several chunks), dtypes and ``None``s."""
    g = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 3, 17, 129, 1000, 2047, 2049, 5000]
    out: list[torch.Tensor | None] = []
    for i in range(count):
        if i % 37 == 5:
            out.append(None)
            continue
        size = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        dtype = DTYPES[i % len(DTYPES)]
        scale = float(torch.rand((), generator=g)) * 4
        out.append((torch.randn(size, generator=g) * scale).to(dtype))
    # Tensors spanning several chunks, one per dtype, shaped as weights.
    out[10] = torch.randn(300, 250, generator=g)  # 75,000 elements: 3 chunks
    out[11] = torch.randn(2, gn_kernels.CHUNK + 1, generator=g).to(torch.bfloat16)
    out[12] = torch.randn(gn_kernels.CHUNK, generator=g).to(torch.float16)
    return out


def test_thousand_mixed_tensors_match_float64(triton_backend: None, poisoned_empty: None) -> None:
    tensors = mixed_tensors(1000, seed=0)
    norms = grad_norms(tensors)
    assert norms.shape == (1000,) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), oracle(tensors), **FP32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_float64(reference_backend: None, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=g).to(dtype) for n in (0, 1, 31, 4097)] + [None]
    torch.testing.assert_close(grad_norms(tensors).double(), oracle(tensors), **FP32)
    torch.testing.assert_close(grad_norms_reference(tensors).double(), oracle(tensors), **FP32)


def test_nan_and_inf_propagate_and_raise_the_flag(any_backend: str, poisoned_empty: None) -> None:
    tensors = [torch.randn(100) for _ in range(6)] + [None, torch.empty(0)]
    tensors[1][7] = float("nan")
    tensors[2] = tensors[2].to(torch.float16)
    tensors[2][50] = float("inf")
    tensors[3] = tensors[3].to(torch.bfloat16)
    tensors[3][0] = float("-inf")
    norms, flag = leak_check(tensors, tol=1e30)
    assert math.isnan(norms[1].item())
    assert norms[2].item() == math.inf and norms[3].item() == math.inf
    expected = oracle([tensors[i] for i in (0, 4, 5, 6, 7)])
    torch.testing.assert_close(norms[[0, 4, 5, 6, 7]].double(), expected, **FP32)
    assert flag.dtype == torch.bool and flag.shape == () and bool(flag)
    assert bool(leak_check(tensors[1:2], tol=1e30)[1])  # NaN alone sets it
    assert not bool(leak_check([tensors[0], tensors[4]], tol=1e30)[1])


def test_flag_threshold(any_backend: str) -> None:
    zeros = [torch.zeros(10), None, torch.empty(0), torch.zeros(3, dtype=torch.bfloat16)]
    norms, flag = leak_check(zeros)  # tol 0: exact zeros are not a leak
    assert not bool(flag) and torch.equal(norms, torch.zeros(4))
    tiny = [*zeros, torch.full((5,), 1e-20)]
    assert bool(leak_check(tiny)[1])
    t = torch.tensor([3.0, 4.0])  # norm exactly 5
    assert bool(leak_check([t], tol=4.99)[1])
    assert not bool(leak_check([t], tol=5.0)[1])


def _extremes(dtype: torch.dtype) -> list[float]:
    """Finite nonzero magnitudes of ``dtype`` whose fp32 squares underflow or overflow
    (where ``dtype`` holds any), down to its smallest subnormal and up to a quarter of its max."""
    info = torch.finfo(dtype)
    wanted = [info.tiny * info.eps, 1e-40, info.tiny, 1e-30, 1e-20, 0.5, 1e20, 1e38, info.max / 4]
    held = {float(torch.tensor(v, dtype=dtype)) for v in wanted}
    return sorted(v for v in held if v != 0 and math.isfinite(v))


def _extreme_tensors(dtype: torch.dtype, seed: int) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    values = _extremes(dtype)
    lo, hi = values[0], values[-1] / 16  # 77 entries of hi still have a finite fp32 norm

    def signed(v: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.rand(v.shape, generator=g) < 0.5, -v, v)

    out: list[torch.Tensor | None] = [torch.full((8,), v, dtype=dtype) for v in values]
    mixed = torch.tensor(values * 3 + [0.0] * 5, dtype=torch.float64)  # one tensor, all scales
    out.append(signed(mixed[torch.randperm(len(mixed), generator=g)]).to(dtype))
    # Random mantissas at one extreme scale, spread over lanes, blocks and the tail.
    out.append(signed(torch.rand(2049, generator=g, dtype=torch.float64) * lo).to(dtype))
    out.append(signed(torch.rand(2049, generator=g, dtype=torch.float64) * hi).to(dtype))
    # Two chunks of opposite extremes: the partials' scales differ by the whole range.
    split = torch.rand(gn_kernels.CHUNK + 77, generator=g, dtype=torch.float64) * lo
    split[gn_kernels.CHUNK :] *= hi / lo
    out.append(signed(split).to(dtype))
    out += [None, torch.zeros(9, dtype=dtype), torch.tensor([0.0, 1.0, 0.0], dtype=dtype)]
    return out


def _assert_norms_match(norms: torch.Tensor, tensors: list[torch.Tensor | None]) -> None:
    """Relative to the float64 norm rounded to fp32: no absolute slack that a tiny norm could
    hide in, beyond one ulp of the smallest subnormal (a subnormal result rounds once)."""
    expected = oracle(tensors).float()
    assert torch.isfinite(expected).all()  # every true norm here is representable
    torch.testing.assert_close(norms.double(), expected.double(), rtol=FP32["rtol"], atol=2**-149)


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_magnitudes_match_float64(
    any_backend: str, poisoned_empty: None, fresh_caches: None, dtype: torch.dtype
) -> None:
    """Norms whose squares leave fp32's range are still exact: alone, mixed in one tensor,
    across chunks of one tensor and across tensors (a scaled sum, not a sum of squares)."""
    tensors = _extreme_tensors(dtype, seed=7 + DTYPES.index(dtype))
    norms = grad_norms(tensors)
    _assert_norms_match(norms, tensors)
    flagged, flag = leak_check(tensors, tol=float(torch.finfo(torch.float32).max))
    torch.testing.assert_close(flagged, norms, rtol=0, atol=0)
    assert not bool(flag)  # all finite, none above tol: huge finite norms do not read as inf
    if any_backend == "reference_backend":
        _assert_norms_match(grad_norms_reference(tensors), tensors)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_tiny_entry_is_a_leak_at_zero_tol(
    any_backend: str, poisoned_empty: None, dtype: torch.dtype
) -> None:
    """The isolation monitor's tol=0: any nonzero entry, down to one subnormal, is a leak."""
    for v in _extremes(dtype)[:3]:  # the smallest subnormal, and the next smallest extremes
        for size, pos in ((1, 0), (37, 36), (2049, 1000), (4097, 4096)):
            t = torch.zeros(size, dtype=dtype)
            t[pos] = -v
            norms, flag = leak_check([torch.zeros(5), None, t, torch.zeros(3, dtype=dtype)])
            assert bool(flag), (v, size, pos)
            assert norms.tolist() == [0.0, 0.0, v, 0.0], (v, size, pos)  # one entry: exactly |v|


@pytest.mark.parametrize("tol", [3.4e38, 3.5e38, 1e39, 1e300])
def test_an_infinite_norm_is_flagged_at_any_finite_tol(any_backend: str, tol: float) -> None:
    """A tolerance above fp32's largest value rounds to inf when compared with fp32 norms, and
    ``inf <= inf``: the reference let an infinite norm (an inf entry, or finite entries whose
    norm overflows) pass for ``tol`` 3.5e38 and up, where the kernel flagged it."""
    for t in (torch.tensor([1.0, float("inf")]), torch.full((8,), 3e38)):
        norms, flag = leak_check([t], tol=tol)
        assert norms.item() == math.inf and bool(flag)
    assert not bool(leak_check([torch.full((8,), 1e20)], tol=tol)[1])


@pytest.mark.parametrize("tol", [0.99999999, 0.9999999701976776, 1.0 - 2.0**-25])
def test_a_tol_just_below_a_norm_flags_it(any_backend: str, tol: float) -> None:
    """The fp32 norms were compared with ``tol`` rounded to the nearest fp32: a tol below 1.0
    that rounds up to it let a norm of exactly 1.0 pass. ``tol`` is rounded down."""
    norms, flag = leak_check([torch.tensor([1.0])], tol=tol)
    assert norms.item() == 1.0 > tol and bool(flag)
    assert not bool(leak_check([torch.tensor([1.0])], tol=1.0)[1])


def test_nan_and_inf_among_extreme_values(any_backend: str, poisoned_empty: None) -> None:
    nan, inf = float("nan"), float("inf")
    spread = torch.full((2049,), 1e-30)
    spread[3], spread[2048] = inf, nan  # NaN wins over inf, whatever the order
    tensors = [
        torch.tensor([1e-30, nan, 1e38]),
        torch.tensor([1e-30, inf, 1e-40]),
        torch.tensor([1e38, -inf, 1e38], dtype=torch.bfloat16),
        torch.tensor([inf, 1e-30, nan], dtype=torch.float16),
        spread,
        torch.full((8,), 3e38),  # finite entries whose true norm (8.5e38) exceeds fp32: inf
        torch.full((8,), 1e-30),
        torch.full((8,), 1e20),
    ]
    norms, flag = leak_check(tensors, tol=1e30)
    assert [math.isnan(v) for v in norms.tolist()] == [True, False, False, True, True] + [False] * 3
    assert norms[1].item() == norms[2].item() == norms[5].item() == math.inf
    _assert_norms_match(norms[6:], tensors[6:])
    assert bool(flag)
    for i in range(6):
        assert bool(leak_check([tensors[i], tensors[6]], tol=1e30)[1]), i
    assert not bool(leak_check(tensors[6:], tol=1e30)[1])  # 2.8e20 is finite and below tol


def test_many_chunks_of_different_scales(
    triton_backend: None,
    poisoned_empty: None,
    fresh_caches: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Partials spanning the whole range, more than the finishing kernel combines per step, the
    largest in a later step than the first: every rescaling of the combine is exercised."""
    monkeypatch.setattr(gn_kernels, "CHUNK", 16)
    monkeypatch.setattr(gn_kernels, "BLOCK", 16)  # one whole block per chunk; cheap to interpret
    monkeypatch.setattr(gn_kernels, "FINISH_BLOCK", 8)
    g = torch.Generator().manual_seed(5)
    chunks = gn_kernels.FINISH_BLOCK * 4 + 3
    exps = torch.randint(-40, 31, (chunks,), generator=g).double()
    exps[gn_kernels.FINISH_BLOCK + 7] = 34  # the largest scale, in the second step
    scale = (10.0**exps).repeat_interleave(16)
    a = (torch.randn(chunks * 16, generator=g, dtype=torch.float64) * scale).float()
    b = a.flip(0)[:-5].to(torch.bfloat16)
    tensors = [a, b, (a * 1e-10).float()]
    _assert_norms_match(grad_norms(tensors), tensors)


def test_use_grad_reads_gradients(any_backend: str) -> None:
    params = [torch.nn.Parameter(torch.randn(s)) for s in (5, 300, 2)]
    params.append(torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16)))
    (params[0].sum() * 3 + (params[1] ** 2).sum() + params[3].float().sum()).backward()
    assert params[2].grad is None
    grads = [p.grad for p in params]
    expected = oracle(grads)
    norms = grad_norms(params, use_grad=True)
    torch.testing.assert_close(norms.double(), expected, **FP32)
    norms2, flag = leak_check([*params, None], tol=1e6, use_grad=True)
    torch.testing.assert_close(norms2[:4], norms)
    assert norms2[4].item() == 0.0 and not bool(flag)


def test_empty_and_all_none_lists(any_backend: str) -> None:
    norms = grad_norms([])
    assert norms.shape == (0,) and norms.dtype == torch.float32
    norms, flag = leak_check([])
    assert norms.shape == (0,) and not bool(flag)
    norms = grad_norms([None, None], device="cpu")
    assert torch.equal(norms, torch.zeros(2))


def test_a_float64_default_dtype_changes_nothing(any_backend: str) -> None:
    """The placeholder of a None entry and the empty result took the default dtype: with
    ``torch.set_default_dtype(torch.float64)``, fp32 gradients beside a None raised
    ("should be convertible without narrowing") and ``grad_norms([])`` was float64."""
    grads = [torch.full((3,), 2.0), None]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        norms, flag = leak_check(grads)
        empty = grad_norms([])
    finally:
        torch.set_default_dtype(previous)
    assert norms.dtype == empty.dtype == torch.float32 and bool(flag)
    torch.testing.assert_close(norms, torch.tensor([math.sqrt(12.0), 0.0]))


def _layouts(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Fresh random values in every layout a caller can hand over, odd sizes throughout."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 3).to(dtype)

    return {
        "contiguous": rand(37, 29),
        "transposed": rand(33, 21).t(),  # dense: read in place
        "permuted-3d": rand(5, 7, 9).permute(2, 0, 1),  # dense: read in place
        "row-slice": rand(40, 31)[:, 3:17],  # not dense: copied
        "step-2": rand(1001)[::2],  # not dense: copied
        "expanded": rand(13).expand(7, 13),  # stride 0: copied, every element counted
        "offset-misaligned": rand(4099)[3:],
        "multi-chunk-offset": rand(gn_kernels.CHUNK + 77)[5:],
        "size-one-dims": rand(1, 45, 1).transpose(0, 2),
        "empty": rand(0, 5).t(),
    }


COPIED = ("row-slice", "step-2", "expanded")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_layout_matches_float64(
    any_backend: str,
    poisoned_empty: None,
    fresh_caches: None,
    launched: list[str],
    dtype: torch.dtype,
) -> None:
    layouts = _layouts(dtype, seed=41 + DTYPES.index(dtype))
    tensors = [*layouts.values(), None]
    norms = grad_norms(tensors)
    assert norms.shape == (len(tensors),) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), oracle(tensors), **FP32)
    flagged_norms, flag = leak_check(tensors, tol=1e9)
    torch.testing.assert_close(flagged_norms, norms, rtol=0, atol=0)
    assert not bool(flag)
    triton = any_backend == "triton_backend"  # both calls ran the kernels; the reference none
    assert set(launched) == (KERNELS if triton else set())


def test_dense_views_are_read_in_place(triton_backend: None, fresh_caches: None) -> None:
    layouts = _layouts(torch.float32, seed=42)
    prepared = gn_kernels.prepare(list(layouts.values()), torch.device("cpu"))
    for (name, t), read in zip(layouts.items(), prepared.tensors, strict=True):
        assert (read is not t) == (name in COPIED), name
        assert read.data_ptr() == t.data_ptr() or read.is_contiguous()


def test_mixed_dtypes_and_layouts_in_one_list(
    triton_backend: None, poisoned_empty: None, fresh_caches: None
) -> None:
    tensors: list[torch.Tensor | None] = [
        t for i, dt in enumerate(DTYPES) for t in _layouts(dt, seed=43 + i).values()
    ]
    tensors.insert(4, None)
    torch.testing.assert_close(grad_norms(tensors).double(), oracle(tensors), **FP32)


def test_same_address_new_layout_is_not_a_stale_hit(
    triton_backend: None, poisoned_empty: None, fresh_caches: None
) -> None:
    """The key holds each tensor's pointer, element count and dtype: a view at the same
    address, a reinterpretation or an in-place resize is recomputed, never served stale."""
    half = torch.randn(200).half()  # every reinterpretation of these bits is finite
    a = half.view(torch.float32)
    for view in (a, a[:50], half, a.view(torch.bfloat16)[:77], a):
        torch.testing.assert_close(grad_norms([view]).double(), oracle([view]), **FP32)
    b = torch.randn(64)
    grad_norms([b])
    b.resize_(10)  # same object, same data pointer, fewer elements
    torch.testing.assert_close(grad_norms([b]).double(), oracle([b]), **FP32)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        grad_norms([a.view(torch.int32)])  # same address, unsupported dtype: validated again


def test_new_storage_same_structure(triton_backend: None, poisoned_empty: None) -> None:
    a, b = torch.randn(40, 30), torch.randn(7, 9, dtype=torch.float16)
    tensors = [a.t(), b[:, ::2], a]
    torch.testing.assert_close(grad_norms(tensors).double(), oracle(tensors), **FP32)
    # Same shapes, different storage: the cached plan must read the new pointers.
    fresh = [torch.randn(40, 30).t(), torch.randn(7, 9, dtype=torch.float16)[:, ::2], a * 2]
    torch.testing.assert_close(grad_norms(fresh).double(), oracle(fresh), **FP32)


def test_aligned_and_misaligned_tensors_form_separate_groups(
    triton_backend: None, poisoned_empty: None, fresh_caches: None
) -> None:
    base = torch.randn(5000)
    tensors = [base[1:], base[:4097], torch.randn(3000, dtype=torch.bfloat16)[3:], base[4:9]]
    torch.testing.assert_close(grad_norms(tensors).double(), oracle(tensors), **FP32)
    plan = gn_kernels.prepare(tensors, torch.device("cpu")).plan
    groups = {(g.dtype, g.aligned): g for g in plan.groups}
    assert set(groups) == {(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)}
    # base[4:9] starts 16 bytes in: aligned, in the vectorised group with base[:4097].
    assert groups[(torch.float32, True)].table[:, 0].tolist() == [1, 3]
    assert groups[(torch.float32, False)].table[:, 0].tolist() == [0]


def test_many_chunks_per_tensor(
    triton_backend: None,
    poisoned_empty: None,
    fresh_caches: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small chunks so that one tensor has more partials than the finishing kernel sums per step.
    monkeypatch.setattr(gn_kernels, "CHUNK", 16)
    tensors = [torch.randn(16 * gn_kernels.FINISH_BLOCK + 37), torch.randn(16), torch.randn(5)]
    torch.testing.assert_close(grad_norms(tensors).double(), oracle(tensors), **FP32)


def test_repeated_call_hits_the_cache(triton_backend: None, fresh_caches: None) -> None:
    cpu = torch.device("cpu")
    tensors = [torch.randn(10), None, torch.randn(3, dtype=torch.float16)]
    first = gn_kernels.prepare(tensors, cpu)
    again = gn_kernels.prepare(list(tensors), cpu)  # a new list of the same tensors
    assert again.pointers is first.pointers and again.plan is first.plan
    torch.testing.assert_close(grad_norms(tensors), grad_norms(tensors), rtol=0, atol=0)
    assert len(gn_kernels._launches) == 1 and len(gn_kernels._plans) == 1
    # Same structure, new pointers: the chunk tables are shared, the pointer table is new.
    fresh = [torch.randn(10), None, torch.randn(3, dtype=torch.float16)]
    other = gn_kernels.prepare(fresh, cpu)
    assert other.plan is first.plan and other.pointers is not first.pointers
    assert len(gn_kernels._launches) == 2 and len(gn_kernels._plans) == 1
    # New pointers are validated before anything is read.
    with pytest.raises(ValueError, match="expected cpu"):
        grad_norms([torch.randn(10, device="meta"), None, tensors[2]], device="cpu")


def test_dense_views_hit_the_cache_without_validation(
    triton_backend: None, poisoned_empty: None, fresh_caches: None
) -> None:
    """A list holding dense views read in place (``w.t()``, a channels_last conv weight and its
    gradient) is a hit on a repeated call, as an all-contiguous list is: it was validated and
    every entry re-checked for density on every call (3x the host time at 1,000 tensors)."""
    cpu = torch.device("cpu")
    checked: list[int] = []

    def check_entry(i: int, t: object, device: torch.device) -> None:
        checked.append(i)

    conv = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    tensors = [torch.randn(10), torch.randn(6, 5).t(), conv, None]
    first = gn_kernels.prepare(tensors, cpu, check_entry)
    assert checked == [0, 1, 2] and all(map(operator.is_, first.tensors[:3], tensors))
    checked.clear()
    again = gn_kernels.prepare(list(tensors), cpu, check_entry)
    assert not checked and again.pointers is first.pointers and again.plan is first.plan
    # Same address, element count and dtype, but strides that are not a dense span: recomputed
    # from a copy, never read in place as the cached entry's layout.
    base = torch.randn(8, 16)
    dense, strided = base.view(-1)[:64].view(8, 8).t(), base[:, ::2]
    assert (dense.data_ptr(), dense.numel()) == (strided.data_ptr(), strided.numel())
    for view in (dense, strided, dense):
        torch.testing.assert_close(grad_norms([view]).double(), oracle([view]), **FP32)


def test_a_groups_first_partial_compiles_no_variant() -> None:
    """``base`` (where a group's partials start) depends on the other groups of the list: as an
    int Triton specialises (equal to 1, a multiple of 16, neither), each new value class was
    another GPU compile of the same kernel. Checked with Triton's binder for sm_90 (no GPU)."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend

        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # no NVIDIA backend in this Triton build
        pytest.skip(f"no Triton NVIDIA backend: {exc}")
    kernel = gn_kernels._sumsq_kernel  # under the interpreter, its decorator's arguments
    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    table, partials = torch.zeros(3, dtype=torch.int64), torch.zeros(2)
    constexprs = {"DTYPE": gn_kernels._TL_DTYPE[torch.float32], "ALIGNED": True, "BLOCK": 2048}
    keys = {
        str(binder(table, table, partials, base, **constexprs, debug=False)[1])
        for base in (0, 1, 2, 16, 4097)
    }
    assert len(keys) == 1, keys


def test_caches_are_bounded_lrus(triton_backend: None, fresh_caches: None) -> None:
    cpu = torch.device("cpu")
    keep = [torch.randn(8)]
    hot = gn_kernels.prepare(keep, cpu)
    for i in range(gn_kernels._LAUNCHES + 3):
        gn_kernels.prepare([torch.randn(8)], cpu)
        if i % 2 == 0:
            assert gn_kernels.prepare(keep, cpu).pointers is hot.pointers  # recently used
    assert len(gn_kernels._launches) == gn_kernels._LAUNCHES
    assert gn_kernels.prepare(keep, cpu).pointers is hot.pointers
    for size in range(1, gn_kernels._PLANS + 4):
        gn_kernels.prepare([torch.randn(size)], cpu)
    assert len(gn_kernels._plans) == gn_kernels._PLANS
    assert len(gn_kernels._launches) == gn_kernels._LAUNCHES


def test_bad_entry_after_a_hit_is_rejected(any_backend: str, fresh_caches: None) -> None:
    tensors = [torch.randn(4), torch.randn(5)]
    grad_norms(tensors)
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a Tensor or None"):
        grad_norms([tensors[0], 5])


def test_a_tensor_without_dense_storage_is_refused_naming_it(
    any_backend: str, fresh_caches: None
) -> None:
    """A sparse gradient (``nn.Embedding(sparse=True)``) raised torch's own errors, another on
    each backend; a ZeroTensor (storage-less, ``data_ptr() == 0``) put address 0 in the
    kernel's pointer table, and the interpreter died of a segmentation fault."""
    dense = torch.randn(4)
    with pytest.raises(ValueError, match=r"tensors\[1\] must be a dense \(strided\) tensor"):
        leak_check([dense, torch.ones(3).to_sparse()])
    zero = torch._efficientzerotensor(5)
    if any_backend == "triton_backend":
        with pytest.raises(ValueError, match=r"tensors\[1\] has no storage"):
            grad_norms([dense, zero])
    else:  # the reference reads it through torch: a norm of 0
        assert float(grad_norms([dense, zero])[1]) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only on CUDA")
def test_leak_check_on_fresh_grads_never_syncs_the_host(fresh_caches: None) -> None:
    """The isolation monitor's pattern: every check sees newly allocated grads (new pointers),
    so the pointer table is rebuilt each time; uploading it must not wait for the stream."""
    shapes = [(300, 250), (7,), (gn_kernels.CHUNK + 5,)]
    leak_check([torch.randn(s, device="cuda") for s in shapes])  # plan + compiled kernels
    fresh = [torch.randn(s, device="cuda") for s in shapes]
    new_structure = [torch.randn(s, device="cuda") for s in [(3, 3), *shapes]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        norms, flag = leak_check(fresh, tol=1e9)
        norms_b = grad_norms(new_structure)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(norms.cpu().double(), oracle(fresh), **FP32)
    torch.testing.assert_close(norms_b.cpu().double(), oracle(new_structure), **FP32)
    assert not bool(flag)


def test_reference_functions_directly() -> None:
    tensors = [torch.tensor([3.0, 4.0]), None, torch.tensor([float("nan")])]
    norms, flag = leak_check_reference(tensors, tol=100.0)
    assert norms[0].item() == 5.0 and norms[1].item() == 0.0 and math.isnan(norms[2].item())
    assert bool(flag)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ([torch.ones(3, dtype=torch.int32)], "float32, float16 or bfloat16"),
        ([torch.ones(3, dtype=torch.float64)], "float32, float16 or bfloat16"),
        ([torch.ones(3), torch.ones(3, device="meta")], "expected cpu"),
        ([torch.ones(3), "x"], "Tensor or None"),
        ([1.0], r"tensors\[0\] must be a Tensor or None, got float"),
        ([None, "x"], r"tensors\[1\] must be a Tensor or None, got str"),
        ([None, object(), torch.ones(3)], r"tensors\[1\] must be a Tensor or None"),
    ],
)
def test_bad_inputs_raise(any_backend: str, tensors: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        grad_norms(tensors)
    with pytest.raises(ValueError, match=message):
        leak_check(tensors)


def test_a_wrapper_subclass_is_refused_naming_it(any_backend: str, fresh_caches: None) -> None:
    """A tensor subclass that wraps other tensors (a DTensor, torch's ``TwoTensor``) has no
    storage of its own: the CPU path raised ``.numpy() is not supported for tensor subclasses``
    from inside its repair step, the kernels' path a ValueError blaming a ZeroTensor."""
    from torch.testing._internal.two_tensor import TwoTensor

    wrapped = TwoTensor(torch.randn(4), torch.randn(4))
    for op in (grad_norms, leak_check):
        with pytest.raises(ValueError, match=r"tensors\[1\] is a TwoTensor, a tensor subclass"):
            op([torch.randn(3), wrapped])


@pytest.mark.parametrize("device", ["cuda:7", "cuda", "meta"])
def test_a_device_other_than_the_tensors_is_the_documented_error(
    any_backend: str, device: str
) -> None:
    """On a CPU build, ``device="cuda:7"`` raised torch's "not compiled with CUDA enabled"
    (an AssertionError) before the mismatch was looked at."""
    for op in (grad_norms, leak_check):
        with pytest.raises(ValueError, match=r"tensors\[1\] is on cpu, expected"):
            op([None, torch.ones(3)], device=device)


def test_non_tensor_entry_raises_value_error_everywhere(any_backend: str) -> None:
    """The documented ValueError, never an AttributeError: with ``use_grad``, a device given,
    and through the public reference functions."""
    for call in (
        lambda: grad_norms([torch.ones(2), 1.0], use_grad=True),
        lambda: leak_check([None, "x"], use_grad=True),
        lambda: grad_norms([None, "x"], device="cpu"),
        lambda: leak_check([2.0], device="cpu"),
        lambda: grad_norms_reference([None, "x"]),
        lambda: leak_check_reference([1.0]),
    ):
        with pytest.raises(ValueError, match="must be a Tensor or None"):
            call()


def test_single_tensor_is_not_a_list(any_backend: str) -> None:
    with pytest.raises(ValueError, match="sequence of tensors"):
        grad_norms(torch.ones(3, 4))


@pytest.mark.parametrize(
    "bad_tol",
    [-1.0, float("nan"), float("inf"), True, False, np.True_, "0.5", None, torch.tensor(0.5)]
    + [10**400],  # an int past float's range: float() raised OverflowError
)
def test_bad_tolerance_raises(any_backend: str, bad_tol: object) -> None:
    """``tol`` is a real number: not a bool (``float(True)`` would be 1.0), not a string (nor
    ``float("0.5")``), not a tensor; finite and >= 0. Eager, through the dispatcher (a
    dispatch mode, as under tracing) and in the reference function alike."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with pytest.raises(ValueError, match="tol"):
        leak_check([torch.ones(3)], tol=bad_tol)
    with pytest.raises(ValueError, match="tol"), _Passthrough():
        leak_check([torch.ones(3)], tol=bad_tol)
    with pytest.raises(ValueError, match="tol"):
        leak_check_reference([torch.ones(3)], tol=bad_tol)


@pytest.mark.parametrize("good_tol", [2, 2.0, np.float32(2.0), np.float64(2.0)])
def test_real_tolerances_are_accepted(any_backend: str, good_tol: object) -> None:
    """Any real number: an int, a float, a NumPy float (norm 2 is not above tol 2, 3 is)."""
    assert not bool(leak_check([torch.tensor([2.0])], tol=good_tol)[1])
    assert bool(leak_check([torch.tensor([3.0])], tol=good_tol)[1])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_transforms_are_refused_by_name_and_forward_mode_measures_the_primal(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``torch.func`` the CPU path failed inside (a wrapped tensor's ``.numpy()``), with
    another error per backend; under forward-mode AD the reference path raised on a dual input
    where the kernel measured it. Transforms are refused naming the op; a dual is measured as
    its primal (the norms have no tangent), on both backends."""
    monkeypatch.setenv("KASMINA_BACKEND", backend)
    w = torch.randn(3, generator=torch.Generator().manual_seed(5))
    with pytest.raises(RuntimeError, match="leak_check does not run under a torch.func"):
        torch.func.grad(lambda v: ((v * v).sum(), leak_check([v], 0.5)), has_aux=True)(w)
    with pytest.raises(RuntimeError, match="grad_norms does not run under a torch.func"):
        torch.func.vmap(lambda r: grad_norms([r]))(torch.randn(4, 3))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(w.clone(), torch.ones(3))
        norms = grad_norms([dual, None])
        leaked, flag = leak_check([dual], 0.5)
    want = torch.tensor([w.double().norm().item(), 0.0], dtype=torch.float32)
    torch.testing.assert_close(norms, want)
    torch.testing.assert_close(leaked, want[:1])
    assert bool(flag)
