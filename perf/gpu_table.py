"""Measurement harness of ``perf/bench_gpu.py``: timing, host overhead, memory, kernel counts,
the copy-bandwidth roofline, correctness checks and the table.

Two times per row, because they answer different questions:

- ``ms``: device time per call by ``triton.testing.do_bench`` (CUDA events, warm-up, L2
  flushed between repetitions, the median). What the kernels cost, cold cache.
- ``wall ms``: wall-clock per call of ``n`` calls issued back to back and one synchronisation,
  so Python, autograd, dispatch and launch overhead are in, and the L2 is not flushed. What a
  training loop sees. ``host us`` is the CPU time to *issue* one call (no synchronisation):
  the host overhead alone, which hides behind the GPU only while the GPU is busier.

The roofline is the device's copy bandwidth, measured in the same run by timing a large
``copy_`` (read + write). ``GB/s`` counts the bytes a perfect fused implementation must move
(given per case), so every implementation of a case is measured against the same work. The
first implementation measured for a case is ours; every other one reports its time over ours
(> 1: ours is faster). ``peak MiB`` is the peak memory one call allocates above what was
allocated before it (its outputs included), for eager and compiled implementations alike.
Every implementation is checked against a float64 reference before it is timed; a mismatch is
reported in the table, never hidden, and a failing peer (out of memory, no compiler) becomes
a row with its error. A time budget skips what is left once spent, with a note.

``device="cpu"`` is the smoke mode: the same cases at tiny sizes, timed with
``time.perf_counter``, without memory or kernel counts, so a bug in the benchmark code shows
without a GPU (the Triton kernels then run through the interpreter).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Row:
    op: str
    case: str
    impl: str
    ms: float | None = None  # device time per call, L2 flushed (do_bench median)
    vs_ours: float | None = None  # this implementation's ms / ours (> 1: ours is faster)
    wall_ms: float | None = None  # wall-clock per call, back to back, host overhead included
    wall_vs_ours: float | None = None
    host_us: float | None = None  # CPU time to issue one call
    gbps: float | None = None
    roofline: float | None = None  # fraction of the measured copy bandwidth
    kernels: int | None = None
    peak_extra_mib: float | None = None
    note: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace, device: str = "cuda") -> None:
        self.args = args
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.rows: list[Row] = []
        self.deadline = time.monotonic() + args.budget_s
        if self.cuda:
            from triton.testing import do_bench

            self._do_bench = do_bench
        self.copy_gbps = self._copy_bandwidth()

    # ------------------------------------------------------------------ timing
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            return float(
                self._do_bench(fn, warmup=self.args.warmup, rep=self.args.rep, return_mode="median")
            )
        start = time.perf_counter()  # smoke mode: one interpreted call says enough
        fn()
        return (time.perf_counter() - start) * 1e3

    def wall_ms(self, fn: Callable[[], object]) -> tuple[float, float]:
        """``(wall-clock ms per call over n back-to-back calls, host us to issue one call)``."""
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        once = max(time.perf_counter() - start, 1e-6)
        n = max(3 if self.cuda else 1, min(200, int(self.args.wall_ms / 1e3 / once)))
        issue = []
        self.sync()
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            issue.append(time.perf_counter() - t0)
        self.sync()
        wall = (time.perf_counter() - start) / n
        # The first calls are issued while the queue is short: the issue time then is the host
        # overhead (later ones may wait for the queue to drain).
        return wall * 1e3, statistics.median(issue[: max(1, n // 4)]) * 1e6

    def _copy_bandwidth(self) -> float:
        mib = self.args.copy_mib if self.cuda else 16
        src = torch.randn((mib << 20) // 4, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9  # read + write

    # ------------------------------------------------------------------ one measurement
    def over_budget(self) -> bool:
        return time.monotonic() > self.deadline

    def skip(self, op: str, case: str, impl: str, why: str) -> Row:
        row = Row(op, case, impl, note=why)
        self.rows.append(row)
        return row

    def measure(
        self,
        op: str,
        case: str,
        impl: str,
        fn: Callable[[], object],
        nbytes: int | None,
        check: Callable[[object], str] | None = None,
    ) -> Row:
        """Check, then time ``fn``; the first row of a case is ours, the others compare."""
        if self.over_budget():
            return self.skip(op, case, impl, f"skipped: time budget ({self.args.budget_s:g} s)")
        row = Row(op, case, impl)
        try:
            result = fn()  # also the warm-up (and compilation) call
            self.sync()
            row.note = check(result) if check is not None else ""
            del result
            row.peak_extra_mib = self._peak_extra_mib(fn)
            row.ms = self.time_ms(fn)
            row.wall_ms, row.host_us = self.wall_ms(fn)
            row.kernels = self._count_kernels(fn)
        except Exception as exc:  # a failing peer is reported, never fatal
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            if self.cuda:
                torch.cuda.empty_cache()
        ours = next((r for r in self.rows if r.op == op and r.case == case), None)
        if ours is not None and ours.ms and row.ms:
            row.vs_ours = row.ms / ours.ms
        if ours is not None and ours.wall_ms and row.wall_ms:
            row.wall_vs_ours = row.wall_ms / ours.wall_ms
        if row.ms and nbytes is not None:
            row.gbps = nbytes / (row.ms * 1e-3) / 1e9
            row.roofline = row.gbps / self.copy_gbps
        self.rows.append(row)
        print(
            f"  {op:<12} {case:<44} {impl:<20} {_fmt(row.ms, '.4f')} ms {row.note}",
            file=sys.stderr,
            flush=True,
        )
        return row

    def _peak_extra_mib(self, fn: Callable[[], object]) -> float | None:
        if not self.cuda:
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        result = fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del result
        return peak / 2**20

    def _count_kernels(self, fn: Callable[[], object]) -> int | None:
        """Device kernels (and copies/memsets) one call launches; None without CUDA."""
        if not self.cuda:
            return None
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                self.sync()
            return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
        except Exception:  # profiling is informative only
            return None


def close_check(ref: torch.Tensor, rel: float, view=None) -> Callable[[object], str]:
    """Check the first tensor of a result (through ``view``, e.g. a row subset) against ``ref``
    by relative L2 error."""

    def check(result: object) -> str:
        got = result[0] if isinstance(result, (tuple, list)) else result
        if not isinstance(got, torch.Tensor):
            return "MISMATCH: no tensor"
        if view is not None:
            got = view(got)
        if got.shape != ref.shape:
            return f"MISMATCH shape {tuple(got.shape)}"
        diff = (got.double() - ref.double()).norm().item()
        err = diff / max(ref.double().norm().item(), 1e-30)
        return "" if err <= rel else f"MISMATCH rel err {err:.2g}"

    return check


REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# Rows of each KD case whose gradient is checked against float64.
CHECK_ROWS = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compiled(b: Bench, fn: Callable) -> Callable | None:
    """One ``torch.compile`` object per peer, reused across cases (what a user gets: it
    recompiles on a new dtype and turns shapes dynamic on a second shape)."""
    return torch.compile(fn) if b.args.compile else None


def generator(b: Bench, seed: int) -> torch.Generator:
    return torch.Generator(device=b.device).manual_seed(seed)


# ----------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


HEADER = [
    "op",
    "case",
    "impl",
    "ms",
    "vs ours",
    "wall ms",
    "wall vs ours",
    "host us",
    "GB/s",
    "% copy",
    "kernels",
    "peak MiB",
]


def render(rows: list[Row], copy_gbps: float, device_name: str) -> str:
    body = [
        [
            r.op,
            r.case,
            r.impl,
            _fmt(r.ms, ".4f"),
            _ratio(r.vs_ours),
            _fmt(r.wall_ms, ".4f"),
            _ratio(r.wall_vs_ours),
            _fmt(r.host_us, ".0f"),
            _fmt(r.gbps, ".0f"),
            "-" if r.roofline is None else f"{100 * r.roofline:.0f}%",
            _fmt(r.kernels, "d"),
            _fmt(r.peak_extra_mib, ".1f"),
            r.note,
        ]
        for r in rows
    ]
    columns = zip(HEADER, *[r[:-1] for r in body], strict=True)
    widths = [max(map(len, col)) for col in columns]
    lines = [f"roofline: copy_ bandwidth {copy_gbps:.0f} GB/s on {device_name}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)))
    previous = None
    for r in body:
        if previous is not None and r[0] != previous:
            lines.append("")
        previous = r[0]
        cells = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True))
        lines.append(f"{cells}  {r[-1]}".rstrip())
    return "\n".join(lines)
