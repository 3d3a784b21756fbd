"""GPU table for the fused ops (docs/design.md §8).

Run with ``make bench-gpu`` (``BENCH_ARGS=...`` passes flags) or ``python perf/bench_gpu.py``;
``perf/gpu_check.sh`` installs, runs the CUDA tests and this table, and writes perf/results/.

For each op over realistic sizes: our time, eager PyTorch, ``torch.compile`` of the eager code,
and for the KD loss Liger-Kernel's KL path and its JSD at beta = 0 (forward KL) when
``liger_kernel`` is installed (the ``bench`` extra); each peer's time over ours (> 1: ours is
faster), device time and wall-clock per call with host overhead, achieved GB/s and its fraction
of the copy bandwidth measured in the same run, kernels launched, and the peak extra memory of
one call, for our op eager and compiled too. The harness is ``perf/gpu_table.py``.

Cases (docs/design.md §8 targets):

- KD loss forward+backward at 8 x 4096 rows with V = 128,256 (bf16 and fp16), 50,257 and
  151,936, on shifted logits ``logits[:, :-1]`` (not contiguous), temperature 2, batchmean.
  Bytes: student and teacher read once, the gradient written once (3 logits). The gradient of
  64 rows is checked against float64. Targets: >= 1.5x Liger's KL path, >= 3x eager, >= 50 % of
  the copy bandwidth, peak extra memory <= one logits buffer, eager and compiled.
- Fused-linear KD forward+backward at 8 x 4096 rows, hidden 4096, V = 128,256, bf16, temperature 1
  (so every peer's loss is the same number): ``fused_linear_kd_loss`` at Liger's chunking (1,024
  rows: its fused-linear JSD's rule ``next_pow2(rows / ceil(V / H))`` and its chunked losses'
  default) and at our default chunking, against eager (``h @ W.T`` then ``kd_kl_loss``), Liger's
  fused-linear JSD at beta = 0 (forward KL; ``liger_kernel.transformers.LigerFusedLinearJSD``
  and the chunked ``LigerFusedLinearJSDLoss``, whose cross-entropy term gets weight 0 but is
  still computed) with the teacher as a head, and Liger's ``LigerFusedLinearKLDivLoss`` (when
  the release has it: it takes the teacher's probabilities, computed before the timing) with the
  teacher as logits. Gradients of hidden states and weight; the hidden gradient of 64 rows is
  checked against float64. Target: peak extra memory <= 1/8 of eager's, time <= Liger's
  fused-linear path. Bytes: none (GEMM-bound; no GB/s).
- Alpha blend forward+backward, 8192 x 4096: a 0-d alpha and a per-chunk alpha (8 chunks), both
  with their gradient (7 tensors: forward reads seed and host and writes the output, backward
  reads the gradient, seed and host and writes the seed's gradient), and fp32 without alpha's
  gradient (5 tensors). Target: >= 90 % of copy bandwidth (without alpha's gradient), >= 1.7x.
- Grad norms: 1,000 tensors of mixed shapes and dtypes, and the parameter list of a 1.1B-param
  Llama-shaped model (bf16); leak_check on the latter. Bytes: every tensor read once. Target:
  >= 2x ``_foreach_norm`` + ``stack`` + ``norm``, host time <= 30 us per repeated call.
- Lifecycle: a 1,024- and a 16,384-seed update and tick (latency: no GB/s).

``--smoke`` runs every case at tiny sizes on the CPU, the Triton kernels through the
interpreter, without Liger, compilation, memory or kernel counts: it proves the benchmark code
without a GPU. Without CUDA and without ``--smoke`` it exits with status 2.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton: the kernels run interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("KASMINA_BACKEND", "triton")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_gpu_fused_kd import bench_fused_linear_kd  # noqa: E402  (perf/ is on sys.path)
from gpu_table import (  # noqa: E402
    CHECK_ROWS,
    DTYPES,
    REL_TOL,
    Bench,
    close_check,
    compiled,
    generator,
    render,
)

from kasmina.ops import (  # noqa: E402
    alpha_blend,
    grad_norms,
    kd_kl_loss,
    leak_check,
    lifecycle_tick,
    lifecycle_tick_reference,
    lifecycle_update,
    lifecycle_update_reference,
)
from kasmina.stages import NUM_STAGES, NUM_STATE_COLUMNS, StateColumn  # noqa: E402

Step = Callable[[], object]


# ----------------------------------------------------------------------------- KD loss
TEMPERATURE = 2.0


def _log_probs(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.log_softmax(s / TEMPERATURE, dim=-1), F.log_softmax(t / TEMPERATURE, dim=-1)


def _eager_kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    log_s, log_t = _log_probs(s, t)
    rows = log_s.numel() // log_s.shape[-1]
    kl = F.kl_div(
        log_s.view(rows, -1), log_t.view(rows, -1), reduction="batchmean", log_target=True
    )
    return kl * TEMPERATURE**2


def _ours_kd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return kd_kl_loss(s, t, temperature=TEMPERATURE)


def _liger_kd() -> dict[str, Callable | None]:
    """Liger-Kernel's KD paths on log-probabilities that torch computes first: its KL loss, and
    its generalised JSD at beta = 0, which is forward KL(teacher || student). None for a path
    this install lacks."""
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return {"liger kl_div": None, "liger jsd b=0": None}

    def flat(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_s, log_t = _log_probs(s, t)
        return log_s.view(-1, s.shape[-1]), log_t.view(-1, t.shape[-1])

    def build(make: Callable[[], Callable]) -> Callable | None:
        try:
            loss = make()
        except Exception:  # an older release without this path or without beta = 0
            return None
        return lambda s, t: loss(*flat(s, t)) * TEMPERATURE**2

    return {
        "liger kl_div": build(lambda: liger.LigerKLDIVLoss(reduction="batchmean", log_target=True)),
        "liger jsd b=0": build(lambda: liger.LigerJSD(beta=0.0)),
    }


def _kd_case(b: Bench, batch: int, length: int, vocab: int, dt: str, peers: dict) -> None:
    """``logits[:, :-1]`` of ``[batch, length + 1, vocab]`` student and teacher logits."""
    dtype = DTYPES[dt]
    gen = generator(b, vocab)
    shape = (batch, length + 1, vocab)
    base = torch.randn(shape, device=b.device, dtype=dtype, generator=gen).requires_grad_()
    student = base[:, :-1]
    teacher = torch.randn(shape, device=b.device, dtype=dtype, generator=gen)[:, :-1]
    rows = batch * length
    check_rows = min(CHECK_ROWS, length)
    s64 = student[0, :check_rows].detach().double().requires_grad_()
    log_s, log_t = _log_probs(s64, teacher[0, :check_rows].double())
    row_kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) * TEMPERATURE**2
    (ref,) = torch.autograd.grad(row_kl / rows, s64)  # batchmean over all rows
    check = close_check(ref, REL_TOL[dtype], view=lambda g: g[0, :check_rows])
    del s64, log_s, log_t, row_kl

    def step(loss_fn: Callable) -> Step:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            loss = loss_fn(student, teacher)
            (g_student,) = torch.autograd.grad(loss, student)
            return g_student, loss

        return run

    case = f"fwd+bwd {batch}x{length}x{vocab} {dt} [:,:-1]"
    nbytes = 3 * student.numel() * student.element_size()
    ours = b.measure("kd_kl_loss", case, "kasmina", step(_ours_kd), nbytes, check)
    logits_mib = student.numel() * student.element_size() / 2**20
    ours.note = f"{ours.note} logits buffer = {logits_mib:.0f} MiB".strip()
    for impl, fn in peers.items():
        if fn is None:
            b.skip("kd_kl_loss", case, impl, "not installed (pip install -e '.[bench]')")
        else:
            b.measure("kd_kl_loss", case, impl, step(fn), nbytes, check)


def bench_kd(b: Bench) -> None:
    if b.cuda:
        cases = [(8, 4096, 128_256, "bf16"), (8, 4096, 128_256, "fp16")]
        cases += [(8, 4096, 50_257, "bf16"), (8, 4096, 151_936, "bf16")]
    else:
        cases = [(2, 5, 257, "bf16"), (2, 5, 1001, "fp16")]
    peers: dict[str, Callable | None] = {"eager": _eager_kd}
    if b.cuda:  # Liger's kernels need CUDA tensors
        peers.update(_liger_kd())
    if b.args.compile:
        peers["torch.compile"] = compiled(b, _eager_kd)
        peers["kasmina compiled"] = compiled(b, _ours_kd)
    for batch, length, vocab, dt in cases[:1] if b.args.quick else cases:
        _kd_case(b, batch, length, vocab, dt, peers)
        if b.cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- alpha blend
def _eager_blend(s: torch.Tensor, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    if a.dim() == 1:  # per-chunk: chunk k of the last dim uses a[k]
        # In the data's dtype, as the 0-d alpha is: an fp32 [cols] alpha would promote the
        # output (and the backward) to fp32, twice the bytes ours moves.
        a = a.to(s.dtype).repeat_interleave(s.shape[-1] // a.numel())
    return a * s + (1 - a) * h.detach()


def _blend_case(b: Bench, rows: int, cols: int, dt: str, alpha_kind: str, peers: dict) -> None:
    dtype = DTYPES[dt]
    gen = generator(b, rows + cols)
    seed = torch.randn(rows, cols, device=b.device, dtype=dtype, generator=gen)
    seed.requires_grad_()
    host = torch.randn(rows, cols, device=b.device, dtype=dtype, generator=gen)
    grad = torch.randn(rows, cols, device=b.device, dtype=dtype, generator=gen)
    with_grad = alpha_kind != "0-d, no grad"
    if alpha_kind == "per-chunk x8":
        alpha = torch.rand(8, device=b.device, generator=gen)
    else:
        alpha = torch.tensor(0.3, device=b.device)
    alpha.requires_grad_(with_grad)
    wrt = (seed, alpha) if with_grad else (seed,)

    def step(blend: Callable) -> Step:
        def run() -> tuple[torch.Tensor, ...]:
            out = blend(seed, host, alpha)
            return torch.autograd.grad(out, wrt, grad)

        return run

    a64 = alpha.detach().double()
    if alpha.dim() == 1:
        a64 = a64.repeat_interleave(cols // alpha.numel())
    check = close_check(a64 * grad.double(), REL_TOL[dtype])
    if with_grad:
        contrib = grad.double() * (seed.detach().double() - host.double())
        ref_alpha = contrib.sum() if alpha.dim() == 0 else contrib.view(rows, 8, -1).sum((0, 2))
        check_seed, check_alpha = check, close_check(ref_alpha, 1e-2)

        def check(result: object) -> str:
            return " ".join(x for x in (check_seed(result[0]), check_alpha(result[1])) if x)

    case = f"fwd+bwd {rows}x{cols} {dt} alpha {alpha_kind}"
    nbytes = (7 if with_grad else 5) * seed.numel() * seed.element_size()
    b.measure("alpha_blend", case, "kasmina", step(alpha_blend), nbytes, check)
    for impl, fn in peers.items():
        b.measure("alpha_blend", case, impl, step(fn), nbytes, check)


def bench_alpha_blend(b: Bench) -> None:
    rows, cols = (8192, 4096) if b.cuda else (16, 64)
    cases = [("bf16", "0-d"), ("bf16", "per-chunk x8"), ("fp32", "0-d, no grad")]
    peers: dict[str, Callable] = {"eager": _eager_blend}
    if b.args.compile:
        peers["torch.compile"] = compiled(b, _eager_blend)
    for dt, kind in cases[:1] if b.args.quick else cases:
        _blend_case(b, rows, cols, dt, kind, peers)


# ----------------------------------------------------------------------------- grad norms
def _llama_like(b: Bench, hidden: int, inter: int, layers: int, vocab: int, kv: int) -> list:
    """The parameter list of a Llama-shaped model (TinyLlama-1.1B at full size), bf16."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]
        shapes += [(inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    shapes += [(hidden,), (vocab, hidden)]
    gen = generator(b, 7)
    return [
        torch.randn(s, device=b.device, dtype=torch.bfloat16, generator=gen) * 1e-2 for s in shapes
    ]


def _mixed(b: Bench, count: int, hidden: int) -> list[torch.Tensor]:
    """``count`` tensors of mixed shapes (weights, biases, small buffers) and dtypes."""
    h = hidden
    pattern = [(h, h), (4 * h, h), (h, 4 * h), (h,), (3 * h, h), (h // 4,), (h, 7), (13,)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    gen = generator(b, 3)
    return [
        torch.randn(pattern[i % len(pattern)], device=b.device, generator=gen).to(
            dtypes[(i // len(pattern)) % len(dtypes)]
        )
        for i in range(count)
    ]


def _foreach_total(ts: list[torch.Tensor]) -> torch.Tensor:
    """What gradient clipping does today: per-tensor norms, stacked, then the total norm."""
    norms = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))
    return torch.linalg.vector_norm(norms)


def _foreach_leak(ts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))
    return norms, ~(norms <= 0.0).all()


def _norms_cases(b: Bench, name: str, tensors: list[torch.Tensor]) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    case = f"{name}, {len(tensors)} tensors, {nbytes / 2**20:.0f} MiB"
    ref = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])
    check = close_check(torch.linalg.vector_norm(ref), 1e-4)
    ours = b.measure(
        "grad_norms", case, "kasmina", lambda: torch.linalg.vector_norm(grad_norms(tensors)),
        nbytes, check,
    )  # fmt: skip
    per_tensor = close_check(ref, 1e-4)(grad_norms(tensors))
    if per_tensor:
        ours.note = f"{ours.note} per-tensor {per_tensor}".strip()
    b.measure("grad_norms", case, "foreach+stack", lambda: _foreach_total(tensors), nbytes, check)
    if b.args.compile:
        foreach_compiled = compiled(b, _foreach_total)
        b.measure(
            "grad_norms", case, "torch.compile", lambda: foreach_compiled(tensors), nbytes, check
        )
    norms_check = close_check(ref, 1e-4)
    leak = {
        "kasmina": lambda: leak_check(tensors, 0.0),
        "foreach+stack": lambda: _foreach_leak(tensors),
    }
    for impl, fn in leak.items():
        b.measure("leak_check", case, impl, fn, nbytes, norms_check)


def bench_grad_norms(b: Bench) -> None:
    if b.cuda:
        model = ("Llama-1.1B params bf16", lambda: _llama_like(b, 2048, 5632, 22, 32_000, 256))
        mixed = ("1000 mixed", lambda: _mixed(b, 1000, 512))
    else:
        model = ("Llama-shaped params bf16", lambda: _llama_like(b, 32, 64, 2, 100, 8))
        mixed = ("100 mixed", lambda: _mixed(b, 100, 16))
    for name, make in [mixed] if b.args.quick else [mixed, model]:
        _norms_cases(b, name, make())
        if b.cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- lifecycle
def _lifecycle_case(b: Bench, seeds: int) -> None:
    g = generator(b, seeds)
    state = torch.zeros(seeds, NUM_STATE_COLUMNS, dtype=torch.int32, device=b.device)
    stages = torch.randint(0, NUM_STAGES, (seeds,), device=b.device, generator=g)
    state[:, StateColumn.LIFECYCLE_STAGE] = stages.to(torch.int32)
    state[:, StateColumn.EMBARGO_COUNTER] = torch.randint(
        0, 2, (seeds,), device=b.device, generator=g, dtype=torch.int32
    )
    idx = torch.randperm(seeds, device=b.device, generator=g)
    new = torch.randint(0, NUM_STAGES, (seeds,), device=b.device, generator=g)
    expected = lifecycle_update_reference(state.clone(), idx, new)

    def check(codes: object) -> str:
        return "" if torch.equal(codes, expected) else "MISMATCH codes"

    impls: list[tuple[str, Callable, Callable]] = [
        ("kasmina", lifecycle_update, lifecycle_tick),
        ("eager", lifecycle_update_reference, lifecycle_tick_reference),
    ]
    if b.args.compile:
        impls.append(
            (
                "torch.compile",
                compiled(b, lifecycle_update_reference),
                compiled(b, lifecycle_tick_reference),
            )
        )
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
    sizes = (1024, 16384) if b.cuda else (64,)
    for seeds in sizes[:1] if b.args.quick else sizes:
        _lifecycle_case(b, seeds)


OPS = {
    "kd_kl_loss": bench_kd,
    "fused_linear_kd": bench_fused_linear_kd,
    "alpha_blend": bench_alpha_blend,
    "grad_norms": bench_grad_norms,
    "lifecycle": bench_lifecycle,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), help="ops to run")
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this path")
    p.add_argument("--out", type=Path, help="also write the table as text to this path")
    p.add_argument("--quick", action="store_true", help="one case per op")
    p.add_argument("--smoke", action="store_true", help="tiny cases on the CPU (no GPU needed)")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile peers (each compiles for tens of seconds)",
    )
    p.add_argument("--budget-s", type=float, default=3600.0, help="skip what is left after this")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--wall-ms", type=float, default=200.0, help="wall-clock window per row, ms")
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the roofline copy, MiB")
    args = p.parse_args(argv)
    if args.smoke:
        args.compile = False  # Inductor on a CPU compiles for minutes and proves nothing here
    return args


def _meta(b: Bench, device_name: str) -> dict[str, object]:
    import triton

    try:
        from importlib.metadata import version

        liger = version("liger-kernel")
    except Exception:  # not installed
        liger = None
    return {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "liger_kernel": liger,
        "python": platform.python_version(),
        "copy_gbps": b.copy_gbps,
        "args": {k: str(v) for k, v in vars(b.args).items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device; the GPU table needs one (--smoke runs it on a CPU, "
            "CPU benchmarks: make bench)",
            file=sys.stderr,
        )
        return 2
    torch.set_grad_enabled(True)
    bench = Bench(args, "cpu" if args.smoke else "cuda")
    device_name = torch.cuda.get_device_name() if bench.cuda else "CPU (smoke: interpreter)"
    try:
        for name in args.ops:
            OPS[name](bench)
    except KeyboardInterrupt:  # gpu_check.sh's hard limit: keep the rows measured so far
        bench.skip("-", "-", "-", "interrupted: the rows above are all that ran")
    table = render(bench.rows, bench.copy_gbps, device_name)
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in bench.rows]
        args.json.write_text(json.dumps({**_meta(bench, device_name), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
