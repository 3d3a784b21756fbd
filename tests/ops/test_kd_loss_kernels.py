"""kd_kl_loss's Triton launchers called directly (through the interpreter on a CPU, compiled
on a GPU) against the float64 oracle: rows read through strides, odd shapes down to one element,
the merged lane reductions, a vocabulary past 131,072 through the op, statistics only when a
gradient is wanted, and the reduction names and host scale the launcher keeps beside the op's;
the forward kernel's PTX for sm_90 (no GPU needed); and the GPU benchmark's KD rows in smoke
mode. Kernel outputs are poisoned with NaN before the launch, so an element the kernel forgets
to write fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import kasmina.kernels.kd_loss as kernels
import pytest
import torch

from kasmina.ops import kd_kl_loss
from kasmina.ops.kd_loss import _host_scale, kd_forward_reference
from kasmina.ops.kd_oracle import REDUCTIONS as OP_REDUCTIONS
from tests.ops.bench_smoke import gpu_bench_smoke_rows
from tests.ops.kd_helpers import KERNEL_WARNINGS, _gen
from tests.ops.kd_loss_helpers import NINF, _close, _logits, _oracle
from tests.ops.tolerances import DTYPES

pytestmark = [*KERNEL_WARNINGS, pytest.mark.usefixtures("on_device")]


@pytest.mark.parametrize(
    ("dtype", "reduction", "masked", "vocab"),
    [
        (torch.float32, "none", True, 257),
        (torch.float32, "sum", False, 1001),
        (torch.float32, "mean", True, 1000),
        (torch.float32, "batchmean", False, 5),
        (torch.float16, "batchmean", True, 1001),
        (torch.float16, "none", False, 257),
        (torch.bfloat16, "mean", False, 1001),
        (torch.bfloat16, "sum", True, 64),
    ],
)
def test_kernels_match_float64_on_strided_rows(dtype, reduction, masked, vocab):
    """Forward and backward launchers on ``logits[:, :-1]`` (and a teacher starting one element
    past a 16-byte boundary), block 64 so rows take a head, several unmasked body steps and a
    masked tail; a per-row ``grad_output`` for ``none``; every output poisoned first."""
    seed = 100 + vocab + len(reduction)
    gen = _gen(seed)
    full_s = (torch.randn(2, 4, vocab, generator=gen) * 3).to(dtype)
    full_t = (torch.randn(2, 4, vocab + 1, generator=gen) * 3).to(dtype)
    student, teacher = full_s[:, :-1], full_t[:, :-1, 1:]
    mask = torch.rand(2, 3, generator=gen) > 0.4 if masked else None
    rows = 6
    loss_rows = torch.full((rows,), float("nan"))
    stats = torch.full((2, 3, 4), float("nan"))
    loss, stats_out, scale = kernels.kd_forward(
        student, teacher, mask, 2.0, reduction, True,
        loss_rows_out=loss_rows, stats_out=stats, block_v=64,
    )  # fmt: skip
    assert stats_out is stats and loss.dtype == torch.float32
    go = torch.randn(loss.shape, generator=gen) if reduction == "none" else torch.tensor(1.7)
    out = torch.full_like(student, float("nan"))
    grad = kernels.kd_backward(
        student, teacher, mask, stats, scale, go, 2.0, reduction, out=out, block_v=64
    )
    assert grad is out and grad.dtype == dtype
    exp_loss, exp_grad = _oracle(student, teacher, 2.0, reduction, mask, go)
    _close(loss, exp_loss, dtype)
    _close(grad, exp_grad, dtype)
    if mask is not None:
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # written, not NaN
        assert torch.equal(loss_rows.view(2, 3)[~mask], torch.zeros(int((~mask).sum())))


@pytest.mark.parametrize(
    ("shape", "reduction"),
    [((1, 1), "batchmean"), ((3, 1), "none"), ((1, 17), "sum"), ((2, 3, 33), "none")],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_on_odd_shapes_down_to_one_element(
    launched: list[str], dtype: torch.dtype, shape: tuple[int, ...], reduction: str
) -> None:
    """One logit (a KL of 0 and a zero gradient, written), one row, and vocabularies below,
    at and past the block (16: head, body and tail), fresh random per case, outputs poisoned,
    every dtype, against the float64 oracle."""
    student, teacher = _logits(shape, dtype, seed=sum(shape) + DTYPES.index(dtype))
    rows = student[..., 0].numel()
    loss_rows = torch.full((rows,), float("nan"))
    stats = torch.full((*shape[:-1], 4), float("nan"))
    loss, _, scale = kernels.kd_forward(
        student, teacher, None, 1.5, reduction, True,
        loss_rows_out=loss_rows, stats_out=stats, block_v=16,
    )  # fmt: skip
    go = torch.rand(loss.shape, generator=_gen(rows)) + 0.5
    out = torch.full_like(student, float("nan"))
    grad = kernels.kd_backward(
        student, teacher, None, stats, scale, go, 1.5, reduction, out=out, block_v=16
    )
    exp_loss, exp_grad = _oracle(student, teacher, 1.5, reduction, None, go)
    _close(loss, exp_loss, dtype)
    _close(grad, exp_grad, dtype)
    if shape[-1] == 1:  # a single logit: both distributions are 1, nothing to learn
        assert not loss_rows.any() and not grad.any()
    assert launched == ["_kd_fwd_kernel", "_kd_bwd_kernel"]


def test_merged_reductions_match_single_ones():
    """The compiled kernels merge the per-row lane reductions into tuple reductions; the
    interpreter runs them element by element, so this checks them on 16 lanes only."""
    student, teacher = _logits((3, 50), seed=7)
    teacher[1, :20] = NINF
    results = [
        kernels.kd_forward(student, teacher, None, 1.5, "none", True, block_v=16, merged=m)
        for m in (False, True)
    ]
    for a, b in zip(results[0][:2], results[1][:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0.0)


def test_large_vocab_row_through_triton(triton_backend):
    """V >= 131,072 (odd) streams through several interpreter steps."""
    vocab = 131_072 + 77
    student, teacher = _logits((2, vocab), seed=2)
    student.requires_grad_(True)
    loss = kd_kl_loss(student, teacher, 1.5, "batchmean")
    loss.backward()
    exp_loss, exp_grad = _oracle(student, teacher, 1.5, "batchmean")
    _close(loss, exp_loss, torch.float32)
    _close(student.grad, exp_grad, torch.float32)


def test_no_statistics_without_grad(backend):
    student, teacher = _logits((4, 40), seed=4)
    forward = kernels.kd_forward if backend == "triton" else kd_forward_reference
    for reduction in ("mean", "sum"):
        loss, stats, scale = forward(student, teacher, None, 1.0, reduction, False)
        assert stats.numel() == 0 and scale.numel() == 0
    _close(loss, _oracle(student, teacher, 1.0, "sum")[0], torch.float32)
    mask = torch.tensor([True, False, True, True])
    _, stats, scale = forward(student, teacher, mask, 1.0, "batchmean", True)
    assert stats.shape == (4, 4) and scale.shape == () and scale.item() == pytest.approx(1 / 3)


@pytest.mark.parametrize(("reduction", "masked"), [("batchmean", True), ("none", False)])
def test_a_temperature_tensor_gives_the_float_results(backend, reduction, masked):
    """A compiled ``kd_kl_loss`` passes its temperature as a 0-d float64 tensor on the logits'
    device (a float argument would be guarded by value). The kernels then load ``log2(e)/T``
    and its factors from the device: exactly the float's results. The torch path computes
    with the tensor (a CUDA one is never read on the host; a CPU one the op reads, free): the
    float's loss, and its gradient up to the rounding of ``c = T·scale·grad_output``, formed
    in float64 there."""
    from kasmina.ops.kd_loss import kd_backward_reference

    student, teacher = _logits((3, 37), seed=8)
    mask = torch.tensor([True, False, True]) if masked else None
    temperature = 0.7  # log2(e)/T and T² round differently in fp32 than in float64
    tensor_t = torch.tensor(temperature, dtype=torch.float64)
    forward = kernels.kd_forward if backend == "triton" else kd_forward_reference
    backward = kernels.kd_backward if backend == "triton" else kd_backward_reference
    want = forward(student, teacher, mask, temperature, reduction, True)
    got = forward(student, teacher, mask, tensor_t, reduction, True)
    kept = slice(None) if mask is None else mask  # a masked row's stats are not written
    for g, w in ((got[0], want[0]), (got[1][kept], want[1][kept]), (got[2], want[2])):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    go = torch.rand(want[0].shape, generator=_gen(8)) + 0.5
    grad_want = backward(student, teacher, mask, *want[1:], go, temperature, reduction)
    grad_got = backward(student, teacher, mask, *want[1:], go, tensor_t, reduction)
    exact = {"atol": 0, "rtol": 0} if backend == "triton" else {}
    torch.testing.assert_close(grad_got, grad_want, **exact)


def test_launcher_and_op_agree_on_reductions_and_host_scale() -> None:
    """The launcher imports nothing of kasmina and the op's CPU path loads no Triton
    (docs/design.md §1), so each keeps the reduction names and the host part of the scale:
    the two copies must not drift apart."""
    assert kernels.REDUCTIONS == OP_REDUCTIONS
    for reduction in OP_REDUCTIONS:
        for rows, vocab, masked in [(0, 1, False), (1, 7, True), (6, 1001, False), (6, 3, True)]:
            expected = _host_scale(reduction, rows, vocab, masked)
            assert kernels.host_scale(reduction, rows, vocab, masked) == expected


@pytest.mark.skipif(sys.platform != "linux", reason="Triton's ptxas ships for Linux")
def test_odd_vocab_compiles_to_vector_loads_without_loop_barriers(tmp_path: Path):
    """Compiled for sm_90 (no GPU needed) as a launch with V = 50,257 specialises: the body
    loads 16 bytes per instruction, and no loop of the forward kernel holds a barrier (the
    old kernel had ten per step); the lanes are merged once per row, after the loops."""
    script = textwrap.dedent(
        """
        import json, re, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        import kasmina.kernels.kd_loss as K
        names = K._kd_fwd_kernel.arg_names
        sig = {n: "i32" for n in names}
        sig.update(s_ptr="*bf16", t_ptr="*bf16", mask_ptr="*i1", loss_ptr="*fp32",
                   stats_ptr="*fp32", k="fp32", loss_factor="fp32", params_ptr="*fp32")
        const = dict(HAS_MASK=False, WRITE_STATS=True, ALIGN_S=True, ALIGN_T=True, VEC=8,
                     BLOCK_V=K.FWD_BLOCK_V, MERGED=True, DEVICE_PARAMS=False)
        sig.update({n: "constexpr" for n in const})
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in ("s_ptr", "t_ptr", "mask_ptr", "loss_ptr", "stats_ptr")}
        src = ASTSource(K._kd_fwd_kernel, sig, constexprs=const, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": K.NUM_WARPS}).asm["ptx"]
        lines = ptx.splitlines()
        labels = {l.split(":")[0]: i for i, l in enumerate(lines) if l.startswith("$L__BB")}
        loops = []
        for i, line in enumerate(lines):
            target = re.search(r"bra(?:\\.uni)?\\s+(\\$L__BB\\w+);", line)
            if target and labels.get(target.group(1), i + 1) < i:
                loops.append("bar.sync" in "\\n".join(lines[labels[target.group(1)]:i]))
        print(json.dumps({"v4": "ld.global.v4" in ptx, "loops": loops,
                          "bars": ptx.count("bar.sync")}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr:
        pytest.skip(f"ptxas unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert facts["v4"]
    assert facts["loops"] and not any(facts["loops"])  # loops found, none with a barrier
    assert 0 < facts["bars"] <= 8


def test_gpu_bench_kd_rows_run_in_smoke_mode(tmp_path: Path):
    """``perf/bench_gpu.py --smoke``: the KD rows of the GPU table, at tiny sizes on the CPU
    (the kernels interpreted), build, check against float64 and write their JSON, so a bug in
    the benchmark shows without a GPU."""
    rows = gpu_bench_smoke_rows("kd_kl_loss", tmp_path)
    assert {r["impl"] for r in rows} == {"kasmina", "eager"}
