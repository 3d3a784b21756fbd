"""GPU table for the fused ops (docs/design.md §8).

Run with ``make bench-gpu`` or ``python perf/bench_gpu.py``.

For each op over realistic sizes: our time, eager PyTorch, ``torch.compile`` of the eager code,
and Liger-Kernel's KL-div path for the KD loss when ``liger_kernel`` is installed; each peer's
time over ours (> 1: ours is faster); achieved GB/s and its fraction of the device's copy
bandwidth, measured in the same run by timing a large ``copy_`` (the roofline); the number of
device kernels one call launches (profiler); the peak extra memory of one call.

GB/s count the bytes a perfect fused implementation must move (listed per op below), so every
implementation of a row is measured against the same work. The harness (timing, roofline,
table) is ``perf/gpu_table.py``. Each implementation is checked against a float64 reference
before it is timed; a mismatch is reported in the table, never hidden.
Targets: blend fwd+bwd >= 85% of the roofline and >= 2x eager; KD fwd+bwd faster than Liger and
eager with peak extra memory <= one logits buffer; grad norms of 1,000 tensors >= 2x
``_foreach_norm`` + ``stack`` + ``norm``; a 1,024-seed lifecycle update in one launch.

Exit status 2 with a one-line message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_table import REL_TOL, Bench, Row, close_check, render  # perf/ is on sys.path

from kasmina.ops import (
    alpha_blend,
    grad_norms,
    kd_kl_loss,
    lifecycle_tick,
    lifecycle_tick_reference,
    lifecycle_update,
    lifecycle_update_reference,
)
from kasmina.stages import NUM_STAGES, NUM_STATE_COLUMNS, StateColumn

DEVICE = "cuda"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- alpha blend
def _eager_blend(s: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return a * s + (1 - a) * h.detach()


def _blend_case(b: Bench, rows: int, cols: int, dt: str) -> None:
    dtype = DTYPES[dt]
    seed = torch.randn(rows, cols, device=DEVICE, dtype=dtype, requires_grad=True)
    host = torch.randn(rows, cols, device=DEVICE, dtype=dtype)
    grad = torch.randn_like(host)
    alpha = torch.tensor(0.3, device=DEVICE)

    def step(blend: Callable) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            out = blend(seed, host, alpha)
            (g_seed,) = torch.autograd.grad(out, seed, grad)
            return g_seed, out

        return run

    case = f"blend fwd+bwd {rows}x{cols} {dt}"
    nbytes = 5 * seed.numel() * seed.element_size()
    check = close_check(alpha * grad.double(), REL_TOL[dtype])
    b.measure("alpha_blend", case, "kasmina", step(alpha_blend), nbytes, check)
    b.measure("alpha_blend", case, "eager", step(_eager_blend), nbytes, check)
    if b.args.compile:
        compiled = step(torch.compile(_eager_blend))
        b.measure("alpha_blend", case, "torch.compile", compiled, nbytes, check)


def bench_alpha_blend(b: Bench) -> None:
    """Bytes: forward reads seed and host and writes the output; backward reads the gradient
    and writes the seed's (alpha is a 0-d device tensor without grad): 5 tensors."""
    shapes = [(8192, 4096, "bf16"), (8192, 4096, "fp32"), (32768, 8192, "bf16")]
    for rows, cols, dt in shapes[:1] if b.args.quick else shapes:
        _blend_case(b, rows, cols, dt)


# ----------------------------------------------------------------------------- KD loss
TEMPERATURE = 2.0


def _log_probs(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.log_softmax(s / TEMPERATURE, dim=-1), F.log_softmax(t / TEMPERATURE, dim=-1)


def _eager_kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    log_s, log_t = _log_probs(s, t)
    kl = F.kl_div(log_s, log_t, reduction="batchmean", log_target=True)
    return kl * TEMPERATURE**2


def _liger_kd() -> Callable | None:
    """Liger-Kernel's KL-div path: torch log-softmax, then its fused KL loss."""
    try:
        from liger_kernel.transformers.kl_div import LigerKLDIVLoss
    except ImportError:
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return kl(*_log_probs(s, t)) * TEMPERATURE**2

    return loss


def _ours_kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return kd_kl_loss(s, t, temperature=TEMPERATURE)


def _kd_case(b: Bench, rows: int, vocab: int, dt: str, liger: Callable | None) -> None:
    dtype = DTYPES[dt]
    student = torch.randn(rows, vocab, device=DEVICE, dtype=dtype, requires_grad=True)
    teacher = torch.randn(rows, vocab, device=DEVICE, dtype=dtype)

    def step(loss_fn: Callable) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            loss = loss_fn(student, teacher)
            (g_student,) = torch.autograd.grad(loss, student)
            return g_student, loss

        return run

    s64 = student.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(_eager_kd(s64, teacher.double()), s64)
    check = close_check(ref, REL_TOL[dtype])
    del s64
    case = f"kd fwd+bwd {rows}x{vocab} {dt} T={TEMPERATURE:g}"
    nbytes = 3 * student.numel() * student.element_size()
    ours = b.measure("kd_kl_loss", case, "kasmina", step(_ours_kd), nbytes, check)
    logits_mib = student.numel() * student.element_size() / 2**20
    ours.note = f"{ours.note} (one logits buffer = {logits_mib:.0f} MiB)".strip()
    b.measure("kd_kl_loss", case, "eager", step(_eager_kd), nbytes, check)
    if b.args.compile:
        b.measure(
            "kd_kl_loss", case, "torch.compile", step(torch.compile(_eager_kd)), nbytes, check
        )
    if liger is not None:
        b.measure("kd_kl_loss", case, "liger", step(liger), nbytes, check)
    else:
        b.rows.append(Row("kd_kl_loss", case, "liger", note="liger_kernel not installed"))


def bench_kd(b: Bench) -> None:
    """Bytes: read student and teacher logits once, write the student gradient: 3 buffers."""
    shapes = [(4096, 32000, "bf16"), (2048, 128256, "bf16"), (256, 262144, "bf16")]
    shapes.append((4096, 32000, "fp32"))
    liger = _liger_kd()
    for rows, vocab, dt in shapes[:1] if b.args.quick else shapes:
        _kd_case(b, rows, vocab, dt, liger)


# ----------------------------------------------------------------------------- grad norms
def _param_like_tensors(count: int, hidden: int, dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Transformer-shaped parameters: attention, MLP, norm weights and biases, repeated."""
    h = hidden
    pattern = [(h, h), (h, h), (h, h), (h, h), (4 * h, h), (h, 4 * h), (h,), (h,)]
    return [
        torch.randn(pattern[i % len(pattern)], device=DEVICE, dtype=dtypes[i % len(dtypes)])
        for i in range(count)
    ]


def _foreach_total(ts: list[torch.Tensor]) -> torch.Tensor:
    """What gradient clipping does today: per-tensor norms, stacked, then the total norm."""
    norms = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))
    return torch.linalg.vector_norm(norms)


def _ours_total(ts: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(grad_norms(ts))


def _norms_case(b: Bench, name: str, tensors: list[torch.Tensor]) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    case = f"{name} {nbytes / 2**20:.0f} MiB"
    ref = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])
    check = close_check(torch.linalg.vector_norm(ref), 1e-4)
    ours = b.measure("grad_norms", case, "kasmina", lambda: _ours_total(tensors), nbytes, check)
    per_tensor = close_check(ref, 1e-4)(grad_norms(tensors))
    if per_tensor:
        ours.note = f"{ours.note} per-tensor {per_tensor}".strip()
    b.measure("grad_norms", case, "foreach+stack", lambda: _foreach_total(tensors), nbytes, check)
    if b.args.compile:
        compiled = torch.compile(_foreach_total)
        b.measure("grad_norms", case, "torch.compile", lambda: compiled(tensors), nbytes, check)


def bench_grad_norms(b: Bench) -> None:
    """Bytes: every tensor read once."""
    n = 1000
    cases: list[tuple[str, Callable[[], list[torch.Tensor]]]] = [
        (f"{n} params h=512 bf16", lambda: _param_like_tensors(n, 512, [torch.bfloat16])),
        (f"{n} params h=512 fp32", lambda: _param_like_tensors(n, 512, [torch.float32])),
        (
            f"{n} params h=256 fp32+bf16",
            lambda: _param_like_tensors(n, 256, [torch.float32, torch.bfloat16]),
        ),
        (
            f"{n} small fp32 (4096 each)",
            lambda: [torch.randn(4096, device=DEVICE) for _ in range(n)],
        ),
    ]
    for name, make in cases[-1:] if b.args.quick else cases:
        _norms_case(b, name, make())


# ----------------------------------------------------------------------------- lifecycle
def _lifecycle_case(b: Bench, seeds: int, g: torch.Generator) -> None:
    state = torch.zeros(seeds, NUM_STATE_COLUMNS, dtype=torch.int32, device=DEVICE)
    stages = torch.randint(0, NUM_STAGES, (seeds,), device=DEVICE, generator=g)
    state[:, StateColumn.LIFECYCLE_STAGE] = stages.to(torch.int32)
    state[:, StateColumn.EMBARGO_COUNTER] = torch.randint(
        0, 2, (seeds,), device=DEVICE, generator=g, dtype=torch.int32
    )
    idx = torch.randperm(seeds, device=DEVICE, generator=g)
    new = torch.randint(0, NUM_STAGES, (seeds,), device=DEVICE, generator=g)
    expected = lifecycle_update_reference(state.clone(), idx, new)

    def check(codes: object) -> str:
        return "" if torch.equal(codes, expected) else "MISMATCH codes"

    impls: list[tuple[str, Callable, Callable]] = [
        ("kasmina", lifecycle_update, lifecycle_tick),
        ("eager", lifecycle_update_reference, lifecycle_tick_reference),
    ]
    if b.args.compile:
        compiled = (
            torch.compile(lifecycle_update_reference),
            torch.compile(lifecycle_tick_reference),
        )
        impls.append(("torch.compile", *compiled))
    for impl, update, _ in impls:
        work = state.clone()  # each implementation starts from the same table
        case = f"update {seeds} seeds, {seeds} requests"
        b.measure("lifecycle", case, impl, lambda u=update, w=work: u(w, idx, new), None, check)
    for impl, _, tick in impls:
        work = state.clone()
        b.measure("lifecycle", f"tick {seeds} seeds", impl, lambda t=tick, w=work: t(w), None)


def bench_lifecycle(b: Bench) -> None:
    """Latency-bound (a few KiB): no GB/s. Updates repeat on the same table, so after the first
    call most requests are rejected; every implementation still does the same checks."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for seeds in (1024,) if b.args.quick else (1024, 16384):
        _lifecycle_case(b, seeds, g)


OPS = {
    "alpha_blend": bench_alpha_blend,
    "kd_kl_loss": bench_kd,
    "grad_norms": bench_grad_norms,
    "lifecycle": bench_lifecycle,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), help="ops to run")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    p.add_argument("--quick", action="store_true", help="one size per op")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile peers (they compile for minutes)",
    )
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the roofline copy, MiB")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device; the GPU table needs one (CPU benchmarks: make bench)",
            file=sys.stderr,
        )
        return 2
    import triton

    bench = Bench(args, DEVICE)
    for name in args.ops:
        OPS[name](bench)
        torch.cuda.empty_cache()
    print(render(bench.rows, bench.copy_gbps))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "copy_gbps": bench.copy_gbps,
        }
        args.json.write_text(
            json.dumps({**meta, "rows": [asdict(r) for r in bench.rows]}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
