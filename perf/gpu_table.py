"""Measurement harness of ``perf/bench_gpu.py``: timing, kernel counts, memory, the table.

Timing is ``triton.testing.do_bench`` (CUDA events, warm-up, L2 flushed between repetitions,
the median). The roofline is the device's copy bandwidth, measured in the same run by timing a
large ``copy_``. The first implementation measured for a case is ours; every other one reports
its time over ours (> 1: ours is faster).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Row:
    op: str
    case: str
    impl: str
    ms: float | None = None
    vs_ours: float | None = None  # this implementation's time / ours (> 1: ours is faster)
    gbps: float | None = None
    roofline: float | None = None  # fraction of the measured copy bandwidth
    kernels: int | None = None
    peak_extra_mib: float | None = None
    note: str = ""


class Bench:
    def __init__(self, args: argparse.Namespace, device: str = "cuda") -> None:
        from triton.testing import do_bench

        self.do_bench = do_bench
        self.args = args
        self.device = device
        self.rows: list[Row] = []
        self.copy_gbps = self._copy_bandwidth()

    def time_ms(self, fn: Callable[[], object]) -> float:
        return float(
            self.do_bench(fn, warmup=self.args.warmup, rep=self.args.rep, return_mode="median")
        )

    def _copy_bandwidth(self) -> float:
        n = (self.args.copy_mib << 20) // 4
        src = torch.randn(n, device=self.device)
        dst = torch.empty_like(src)
        ms = self.time_ms(lambda: dst.copy_(src))
        return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9  # read + write

    def measure(
        self,
        op: str,
        case: str,
        impl: str,
        fn: Callable[[], object],
        nbytes: int | None,
        check: Callable[[object], str] | None = None,
    ) -> Row:
        """Time ``fn``; the first row of a case is ours and the others are compared to it."""
        row = Row(op, case, impl)
        try:
            result = fn()
            torch.cuda.synchronize()
            row.note = check(result) if check is not None else ""
            del result
            row.ms = self.time_ms(fn)
            row.kernels = _count_kernels(fn)
            row.peak_extra_mib = _peak_extra_mib(fn)
        except Exception as exc:  # a peer that fails (or cannot compile) is reported, not fatal
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        ours = next((r for r in self.rows if r.op == op and r.case == case), None)
        if row.ms is not None:
            if ours is not None and ours.ms is not None:
                row.vs_ours = row.ms / ours.ms
            if nbytes is not None:
                row.gbps = nbytes / (row.ms * 1e-3) / 1e9
                row.roofline = row.gbps / self.copy_gbps
        self.rows.append(row)
        print(f"  {op:<14} {case:<34} {impl:<16} {_fmt(row.ms, '.4f')} ms", file=sys.stderr)
        return row


def _count_kernels(fn: Callable[[], object]) -> int | None:
    """Device kernels (and copies/memsets) one call launches; None if the profiler fails."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception:  # profiling is informative only
        return None


def _peak_extra_mib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak / 2**20


def close_check(ref: torch.Tensor, rel: float) -> Callable[[object], str]:
    """Check the first tensor of a result against ``ref`` by relative L2 error."""

    def check(result: object) -> str:
        got = result[0] if isinstance(result, (tuple, list)) else result
        if not isinstance(got, torch.Tensor) or got.shape != ref.shape:
            return "MISMATCH shape"
        diff = (got.double() - ref.double()).norm().item()
        err = diff / max(ref.double().norm().item(), 1e-30)
        return "" if err <= rel else f"MISMATCH rel err {err:.2g}"

    return check


REL_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


# ----------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(rows: list[Row], copy_gbps: float) -> str:
    header = ["op", "case", "impl", "ms", "vs ours", "GB/s", "roofline", "kernels", "peak MiB"]
    body = [
        [
            r.op,
            r.case,
            r.impl,
            _fmt(r.ms, ".4f"),
            "-" if r.vs_ours is None else f"{r.vs_ours:.2f}x",
            _fmt(r.gbps, ".0f"),
            "-" if r.roofline is None else f"{100 * r.roofline:.0f}%",
            _fmt(r.kernels, "d"),
            _fmt(r.peak_extra_mib, ".1f"),
            r.note,
        ]
        for r in rows
    ]
    widths = [
        max(len(x) for x in col) for col in zip(header, *[r[:-1] for r in body], strict=False)
    ]
    lines = [f"roofline: copy_ bandwidth {copy_gbps:.0f} GB/s on {torch.cuda.get_device_name()}"]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    previous_op = None
    for r in body:
        if previous_op is not None and r[0] != previous_op:
            lines.append("")
        previous_op = r[0]
        lines.append(
            "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        )
    return "\n".join(lines)
