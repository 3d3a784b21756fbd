"""The fused-linear KD rows of the GPU table (``perf/bench_gpu.py``, whose docstring has the
case and its targets): ``fused_linear_kd_loss`` at Liger's chunking and at ours, against eager
(``h @ W.T`` then ``kd_kl_loss``) and Liger's fused-linear losses when they are installed."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from gpu_table import CHECK_ROWS, DTYPES, REL_TOL, Bench, close_check, compiled, generator

from kasmina.ops import fused_linear_kd_loss, kd_kl_loss
from kasmina.ops.fused_linear_kd_chunks import default_chunk_rows

Step = Callable[[], object]


FL_TEMPERATURE = 1.0  # Liger's losses differ in where T² goes; at T = 1 all agree


def _liger_chunk(rows: int, hidden: int, vocab: int) -> int:
    """The rows per chunk of Liger's fused-linear JSD (``next_pow2(rows / ceil(V / H))``)."""
    import triton

    return triton.next_power_of_2(triton.cdiv(rows, triton.cdiv(vocab, hidden)))


def _fl_eager(h, w, t_h, t_w, t_logits):
    """Eager: the logits materialised, then ``kd_kl_loss`` (the teacher's under no_grad)."""
    if t_logits is None:
        with torch.no_grad():
            t_logits = t_h @ t_w.t()
    return kd_kl_loss(h @ w.t(), t_logits, temperature=FL_TEMPERATURE)


def _fl_ours(chunk: int | None) -> Callable:
    def run(h, w, t_h, t_w, t_logits):
        return fused_linear_kd_loss(
            h, w, t_logits, teacher_hidden=t_h, teacher_weight=t_w, temperature=FL_TEMPERATURE,
            chunk_rows=chunk,
        )  # fmt: skip

    return run


def _liger_fused_linear(rows: int, vocab: int, device: torch.device, chunk: int) -> dict:
    """Liger's fused-linear distillation losses that this install has (None where it lacks
    one): ``{impl: (loss_fn, teacher_kind)}`` with ``loss_fn(h, w, t_h, t_w, target)``."""
    peers: dict[str, tuple[Callable | None, str]] = {}
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=FL_TEMPERATURE)
        peers["liger fl-jsd b=0"] = (lambda h, w, th, tw, _: jsd(h, w, th, tw), "head")
    except Exception:  # not installed, or a release without this path or beta = 0
        peers["liger fl-jsd b=0"] = (None, "head")
    try:
        import inspect

        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        options = dict(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0,
                       temperature=FL_TEMPERATURE)  # fmt: skip
        if "chunk_size" in inspect.signature(LigerFusedLinearJSDLoss).parameters:
            options["chunk_size"] = chunk
        chunked = LigerFusedLinearJSDLoss(**options)
        labels = torch.randint(0, vocab, (rows,), device=device)
        n_args = len(inspect.signature(chunked.forward).parameters)
        extra = (None, None) if n_args >= 7 else ()
        peers["liger chunked jsd b=0"] = (
            lambda h, w, th, tw, _: chunked(h, w, th, tw, labels, *extra),
            "head",
        )
    except Exception:
        peers["liger chunked jsd b=0"] = (None, "head")
    try:
        from liger_kernel.transformers import LigerFusedLinearKLDivLoss

        kl = LigerFusedLinearKLDivLoss(reduction="batchmean", temperature=FL_TEMPERATURE)
        peers["liger fl-kldiv"] = (lambda h, w, th, tw, probs: kl(h, w, probs), "probs")
    except Exception:
        peers["liger fl-kldiv"] = (None, "probs")
    return peers


def _fl_case(b: Bench, batch: int, length: int, hidden: int, vocab: int, dt: str) -> None:
    dtype = DTYPES[dt]
    rows = batch * length
    gen = generator(b, hidden + vocab)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(shape, device=b.device, dtype=torch.float32, generator=gen) * scale
        return x.to(dtype)

    h = rand(rows, hidden).requires_grad_()
    w = rand(vocab, hidden, scale=hidden**-0.5).requires_grad_()
    t_h = rand(rows, hidden)
    t_w = rand(vocab, hidden, scale=hidden**-0.5)
    check_rows = min(CHECK_ROWS, rows)
    h64 = h[:check_rows].detach().double().requires_grad_()
    with torch.no_grad():
        t64 = t_h[:check_rows].double() @ t_w.double().t()
    log_s = F.log_softmax(h64 @ w.detach().double().t() / FL_TEMPERATURE, -1)
    log_t = F.log_softmax(t64 / FL_TEMPERATURE, -1)
    row_kl = F.kl_div(log_s, log_t, reduction="sum", log_target=True) * FL_TEMPERATURE**2
    (ref,) = torch.autograd.grad(row_kl / rows, h64)  # batchmean over all rows
    check = close_check(ref, REL_TOL[dtype], view=lambda g: g[:check_rows])
    del h64, t64, log_s, log_t, row_kl
    chunk = _liger_chunk(rows, hidden, vocab)

    def step(loss_fn: Callable, target: torch.Tensor | None = None) -> Step:
        def run() -> tuple[torch.Tensor, ...]:
            loss = loss_fn(h, w, t_h, t_w, target)
            return (*torch.autograd.grad(loss, (h, w)), loss)

        return run

    case = f"fwd+bwd {batch}x{length} H={hidden} V={vocab} {dt} teacher head"
    op = "fused_linear_kd"
    ours = b.measure(op, case, "kasmina", step(_fl_ours(chunk)), None, check)
    ours.note = f"{ours.note} chunk {chunk} rows".strip()
    default = b.measure(op, case, "kasmina default chunk", step(_fl_ours(None)), None, check)
    default_rows = default_chunk_rows(rows, vocab, dtype, dtype, device_type=b.device.type)
    default.note = f"{default.note} chunk {default_rows} rows".strip()
    eager = b.measure(op, case, "eager", step(_fl_eager), None, check)
    if b.args.compile:
        b.measure(op, case, "kasmina compiled", step(compiled(b, _fl_ours(chunk))), None, check)
    liger = _liger_fused_linear(rows, vocab, b.device, chunk) if b.cuda else {}
    for impl, (fn, kind) in liger.items():
        if kind != "head":
            continue
        if fn is None:
            b.skip(op, case, impl, "not in this install (pip install -e '.[bench]')")
        else:
            b.measure(op, case, impl, step(fn), None, check)
    if ours.peak_extra_mib and eager.peak_extra_mib:
        ours.note += f"; peak = 1/{eager.peak_extra_mib / ours.peak_extra_mib:.1f} of eager's"
    if b.cuda:
        torch.cuda.empty_cache()

    # The teacher as logits (given, like the KD rows): ours reads them in place per chunk.
    with torch.no_grad():
        t_logits = t_h @ t_w.t()
    case = f"fwd+bwd {batch}x{length} H={hidden} V={vocab} {dt} teacher logits"

    def given(fn: Callable) -> Callable:
        return lambda h, w, t_h, t_w, _: fn(h, w, None, None, t_logits)

    ours = b.measure(op, case, "kasmina", step(given(_fl_ours(chunk))), None, check)
    ours.note = f"{ours.note} chunk {chunk} rows".strip()
    eager = b.measure(op, case, "eager", step(given(_fl_eager)), None, check)
    kl = liger.get("liger fl-kldiv", (None, "probs"))[0]
    if b.cuda and kl is None:
        b.skip(op, case, "liger fl-kldiv", "not in this liger_kernel release")
    elif kl is not None:
        probs = torch.softmax(t_logits.float() / FL_TEMPERATURE, -1).to(dtype)  # its input
        b.measure(op, case, "liger fl-kldiv", step(kl, probs), None, check)
        del probs
    if ours.peak_extra_mib and eager.peak_extra_mib:
        ours.note += f"; peak = 1/{eager.peak_extra_mib / ours.peak_extra_mib:.1f} of eager's"
    if b.cuda:
        torch.cuda.empty_cache()


def bench_fused_linear_kd(b: Bench) -> None:
    if b.cuda:
        _fl_case(b, 8, 4096, 4096, 128_256, "bf16")
    else:
        _fl_case(b, 2, 5, 16, 257, "bf16")
