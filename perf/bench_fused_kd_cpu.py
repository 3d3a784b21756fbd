"""Fused-linear KD on the CPU: ``fused_linear_kd_loss`` against eager (``h @ W.T`` then
``kd_kl_loss``), forward + backward, time and peak extra memory (docs/design.md §2, §8).

    python perf/bench_fused_kd_cpu.py [--rows 1024] [--hidden 256] [--vocab 32000] [--reps 5]

Each (implementation, dtype) runs in a fresh subprocess, one torch thread: the inputs are built
and one forward + backward runs (for ``compiled``, ``torch.compile(fullgraph=True)`` of the
fused op, this compiles it). Then the peak resident set size is reset (``/proc/self/clear_refs``)
and the resident set size read, one more forward + backward runs, and the peak (``VmHWM``) minus
the size before it is the call's peak extra memory (inputs excluded; gradients included). Then
``--reps`` more calls are timed and the median is printed.

Each child runs with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``). By
default it rises to 32 MiB after the first large free, after which freed buffers stay in the
heap: a second call reuses them and its resident set does not grow. Each child also has an
Inductor cache of its own, so no compiled graph of an older build is replayed. The teacher is a
head (its own hidden states and weight, its logits computed under ``no_grad``); temperature 2,
``batchmean``. Not collected by pytest (no test functions): run it directly. Speeds are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from arguments import positive_int  # perf/ is sys.path[0] when run as a script

from kasmina.ops import fused_linear_kd_loss, kd_kl_loss
from kasmina.ops.fused_linear_kd_chunks import default_chunk_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE = 2.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set size (VmHWM) to the current one


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(impl: str, dt: str, rows: int, hidden: int, vocab: int, reps: int, chunk: int | None):
    torch.set_num_threads(1)
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * scale).to(dtype)

    h = rand(rows, hidden).requires_grad_()
    w = rand(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    t_h = rand(rows, hidden)
    t_w = rand(vocab, hidden, scale=hidden**-0.5)

    def fused(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fused_linear_kd_loss(
            h, w, teacher_hidden=t_h, teacher_weight=t_w, temperature=TEMPERATURE,
            chunk_rows=chunk,
        )  # fmt: skip

    compiled = torch.compile(fused, fullgraph=True)

    def step() -> tuple[torch.Tensor, ...]:
        if impl == "eager":
            with torch.no_grad():
                t_logits = t_h @ t_w.t()
            loss = kd_kl_loss(h @ w.t(), t_logits, TEMPERATURE)
        else:
            loss = (compiled if impl == "compiled" else fused)(h, w)
        return (*torch.autograd.grad(loss, (h, w)), loss)

    step()  # warm-up (and, compiled, the compilation); its results are dropped here
    _reset_peak_rss()
    before = _rss_bytes()
    result = step()
    peak = _peak_rss_bytes() - before
    loss = float(result[-1])
    del result
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(
        json.dumps({"ms": 1e3 * statistics.median(times), "peak_mib": peak / 2**20, "loss": loss})
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=positive_int, default=1024)
    p.add_argument("--hidden", type=positive_int, default=256)
    p.add_argument("--vocab", type=positive_int, default=32000)
    p.add_argument("--reps", type=positive_int, default=5)
    p.add_argument("--chunk-rows", type=int, default=None, help="default: default_chunk_rows")
    p.add_argument("--child", nargs=2, metavar=("IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(*args.child, args.rows, args.hidden, args.vocab, args.reps, args.chunk_rows)
        return 0
    logits_mib = args.rows * args.vocab * 4 / 2**20
    print(f"# torch {torch.__version__}, Python {platform.python_version()}, one torch thread")
    print(
        f"# rows {args.rows}, hidden {args.hidden}, V {args.vocab}, teacher head, T = "
        f"{TEMPERATURE}, batchmean; one fp32 [rows, V] tensor = {logits_mib:.1f} MiB"
    )
    print(
        f"{'dtype':<6} {'impl':<8} {'chunk':>6} {'ms (median)':>12} {'peak extra MiB':>15}"
        f" {'loss':>10}  time vs eager, memory vs eager"
    )
    for dt, dtype in DTYPES.items():
        chunk = args.chunk_rows or default_chunk_rows(
            args.rows, args.vocab, dtype, dtype, device_type="cpu"
        )
        results = {}
        for impl in ("eager", "fused", "compiled"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                impl,
                dt,
                "--rows",
                str(args.rows),
                "--hidden",
                str(args.hidden),
                "--vocab",
                str(args.vocab),
                "--reps",
                str(args.reps),
            ]
            if args.chunk_rows:
                cmd += ["--chunk-rows", str(args.chunk_rows)]
            with tempfile.TemporaryDirectory() as cache:
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
                       "TORCHINDUCTOR_CACHE_DIR": cache}  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            results[impl] = json.loads(out.stdout.strip().splitlines()[-1])
        for impl, r in results.items():
            ratio = ""
            if impl != "eager":
                e = results["eager"]
                memory = r["peak_mib"] / e["peak_mib"] if e["peak_mib"] > 0 else float("nan")
                ratio = f"  {r['ms'] / e['ms']:.2f}x, {memory:.3f}x"  # nan: no peak measured
            label = str(chunk) if impl != "eager" else "-"
            print(
                f"{dt:<6} {impl:<8} {label:>6} {r['ms']:>12.1f} {r['peak_mib']:>15.1f}"
                f" {r['loss']:>10.5f}{ratio}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
