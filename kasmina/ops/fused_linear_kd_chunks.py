"""The chunk engine behind ``fused_linear_kd_loss`` (``kasmina.ops.fused_linear_kd``): the
default chunk size, the per-chunk forward (head GEMM, KD loss and logits gradient, the gradient
folded into the hidden, weight and bias gradients), the ``reduction="none"`` backward that
recomputes each chunk, and the in-place rounding of the fp32 accumulators.

The numerical argument (why chunks are exact, why fp32 accumulation, the soft-cap chain rule,
the memory bound) is in ``kasmina.ops.fused_linear_kd``'s docstring and docs/design.md §2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kasmina.ops.kd_loss import kd_backward_impl, kd_forward_impl

# Scratch budget of one chunk on CUDA (default_chunk_rows). At 8×4096 rows × H 4096 × V 128,256
# in bf16 it gives 640 rows and a peak of 2.7 GiB, 1/9 of eager's; 1 GiB (1,344 rows) would
# pass 1/8 (3.2 GiB), smaller chunks cost more passes over the fp32 weight accumulator.
DEFAULT_CHUNK_BYTES = 512 * 2**20
DEFAULT_CPU_CHUNK_BYTES = 64 * 2**20  # ... and on other devices (the CPU path)
CPU_SCRATCH_BYTES = 16  # per logit: the CPU path's fp32 temporaries (forward and backward)
ROW_MULTIPLE = 64  # default chunks are a multiple of this many rows (GEMM tiles)
ROUND_BLOCK = 1 << 23  # elements per step of the in-place rounding of an accumulator ...
FIRST_ROUND_BLOCK = 1 << 12  # ... whose first step goes through a temporary of this size


# --------------------------------------------------------------------------- chunking


def default_chunk_rows(
    rows: int,
    vocab: int,
    student_dtype: torch.dtype,
    teacher_dtype: torch.dtype | None = None,
    *,
    device_type: str = "cuda",
    budget_bytes: int | None = None,
) -> int:
    """Rows per chunk whose scratch fits ``budget_bytes``: per logit the student's logits and
    their gradient (student dtype), the teacher's chunk when it is computed or gathered
    (``teacher_dtype``; None when the teacher's logits are read in place), and on a non-CUDA
    device the CPU path's fp32 temporaries. At least 1, at most ``rows``; a multiple of 64
    when it is at least 64 and smaller than ``rows``. ``budget_bytes`` defaults to
    ``DEFAULT_CHUNK_BYTES`` on CUDA (512 MiB: big GEMMs, and few passes over the fp32 weight
    accumulator) and ``DEFAULT_CPU_CHUNK_BYTES`` elsewhere (64 MiB), read at call time."""
    if budget_bytes is not None:
        budget = budget_bytes
    elif device_type == "cuda":
        budget = DEFAULT_CHUNK_BYTES
    else:
        budget = DEFAULT_CPU_CHUNK_BYTES
    per_logit = 2 * _itemsize(student_dtype)
    if teacher_dtype is not None:
        per_logit += _itemsize(teacher_dtype)
    if device_type != "cuda":
        per_logit += CPU_SCRATCH_BYTES
    n = max(1, min(max(rows, 1), budget // max(vocab * per_logit, 1)))
    if ROW_MULTIPLE <= n < rows:
        n -= n % ROW_MULTIPLE
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class _Config:
    """Everything that is not a tensor (hashable: the eager Function keeps it on ctx), but a
    traced call's temperature, a 0-d tensor on the device (see ``fused_linear_kd``)."""

    temperature: float | Tensor
    reduction: str
    chunk_rows: int
    student_scale: float | None
    teacher_scale: float | None
    student_cap: float | None
    teacher_cap: float | None
    need_hidden: bool
    need_weight: bool
    need_bias: bool

    @property
    def need_grad(self) -> bool:
        return self.need_hidden or self.need_weight or self.need_bias


@dataclass
class _Rows:
    """The inputs as rows: ``[rows, H]`` hidden states, the teacher's logits as ``[rows, V]``
    (or None: ``gather`` one chunk at a time from ``teacher_nd``), or its head."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    teacher: Tensor | None
    teacher_nd: Tensor | None
    teacher_hidden: Tensor | None
    teacher_weight: Tensor | None
    teacher_bias: Tensor | None
    mask: Tensor | None
    rows: int
    vocab: int


def _as_rows(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
    mask: Tensor | None,
) -> _Rows:  # fmt: skip
    lead = tuple(hidden.shape[:-1])
    rows, vocab = math.prod(lead), weight.shape[0]
    teacher = teacher_nd = None
    if teacher_logits is not None:
        try:
            teacher = teacher_logits.view(rows, vocab)
        except RuntimeError:  # e.g. logits[:, :-1]: gathered per chunk, never copied whole
            teacher_nd = teacher_logits
    t_hidden = None
    if teacher_hidden is not None:
        t_hidden = teacher_hidden.reshape(rows, teacher_hidden.shape[-1])
    return _Rows(
        hidden=hidden.reshape(rows, hidden.shape[-1]), weight=weight, bias=bias,
        teacher=teacher, teacher_nd=teacher_nd, teacher_hidden=t_hidden,
        teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        mask=None if mask is None else _dense(mask.reshape(rows)), rows=rows, vocab=vocab,
    )  # fmt: skip


def _dense(x: Tensor) -> Tensor:
    """A per-row vector (the mask, a ``"none"`` ``grad_output``) made dense once: ``reshape``
    keeps a strided or expanded view where it can (``mask[::2]``, ``m[..., 0]``, the stride-0
    ``grad_output`` of ``.sum()``'s backward), and each chunk then passes a slice of it to the
    KD op's kernels, which index it by row. Rows-sized, so the copy is cheap."""
    return x.contiguous()


def _head_into(
    out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, scale: float | None,
    cap: float | None,
) -> Tensor:  # fmt: skip
    """``cap·tanh(scale·(hidden @ weight.T + bias)/cap)`` written into ``out`` (one GEMM; the
    scale rides on its ``alpha``/``beta``, the cap is applied in place)."""
    s = 1.0 if scale is None else scale
    if bias is not None:
        torch.addmm(bias, hidden, weight.t(), beta=s, alpha=s, out=out)
    elif s != 1.0:
        torch.addmm(out, hidden, weight.t(), beta=0.0, alpha=s, out=out)
    else:
        torch.mm(hidden, weight.t(), out=out)
    if cap is not None:
        out.div_(cap).tanh_().mul_(cap)
    return out


class _Chunker:
    """Per-chunk logits of both sides, in buffers reused across chunks."""

    def __init__(self, r: _Rows, cfg: _Config) -> None:
        self.r, self.cfg = r, cfg
        n = min(cfg.chunk_rows, max(r.rows, 1))
        h = r.hidden
        self.s_buf = torch.empty(n, r.vocab, dtype=h.dtype, device=h.device)
        self.t_buf = None
        if r.teacher_hidden is not None:
            assert r.teacher_weight is not None
            self.t_buf = torch.empty(n, r.vocab, dtype=r.teacher_hidden.dtype, device=h.device)

    def ranges(self) -> list[tuple[int, int]]:
        step = self.cfg.chunk_rows
        return [(r0, min(r0 + step, self.r.rows)) for r0 in range(0, self.r.rows, step)]

    def student(self, r0: int, r1: int) -> Tensor:
        r, cfg = self.r, self.cfg
        return _head_into(
            self.s_buf[: r1 - r0], r.hidden[r0:r1], r.weight, r.bias, cfg.student_scale,
            cfg.student_cap,
        )  # fmt: skip

    def teacher(self, r0: int, r1: int) -> Tensor:
        r, cfg = self.r, self.cfg
        if r.teacher is not None:
            return r.teacher[r0:r1]
        if r.teacher_nd is not None:
            t = r.teacher_nd
            index = torch.arange(r0, r1, device=t.device)
            return t[torch.unravel_index(index, tuple(t.shape[:-1]))]
        assert self.t_buf is not None and r.teacher_hidden is not None
        assert r.teacher_weight is not None
        with torch.no_grad():
            return _head_into(
                self.t_buf[: r1 - r0], r.teacher_hidden[r0:r1], r.teacher_weight,
                r.teacher_bias, cfg.teacher_scale, cfg.teacher_cap,
            )  # fmt: skip

    def mask(self, r0: int, r1: int) -> Tensor | None:
        return None if self.r.mask is None else self.r.mask[r0:r1]


class _Grads:
    """The gradient buffers, and the fold of one chunk's logits gradient into them."""

    def __init__(self, r: _Rows, cfg: _Config) -> None:
        self.r, self.cfg = r, cfg
        h, w = r.hidden, r.weight
        acc = torch.promote_types(w.dtype, torch.float32)
        self.hidden = h.new_empty(h.shape if cfg.need_hidden else (0,))
        self.weight = w.new_empty(0, dtype=acc)
        if cfg.need_weight:
            self.weight = torch.zeros(w.shape, dtype=acc, device=w.device)
        self.bias = h.new_empty(0, dtype=acc)
        if cfg.need_bias:
            assert r.bias is not None
            self.bias = torch.zeros(r.bias.shape, dtype=acc, device=w.device)

    def fold(
        self, grad: Tensor, logits: Tensor, r0: int, r1: int, bound: float | Tensor,
        mask: Tensor | None,
    ) -> None:  # fmt: skip
        """Add the chunk's logits gradient ``grad`` (``d loss / d y``, ``y`` the capped logits
        in ``logits``, whose buffer this spends) to the three gradients. ``bound`` bounds
        ``|grad|``: ``T·|p_s - p_t| <= T`` per unit of the row's ``grad_output``, and the cap's
        derivative is at most 1 (:func:`_add_mm` sizes an fp16 product by it). A row ``mask``
        drops reaches nothing, as in ``kd_kl_loss``: its gradient is 0 and stays 0 through the
        cap's derivative and the weight's product, where its logits or hidden state may be
        non-finite (a padded position's): ``0 · NaN`` is NaN."""
        r, cfg = self.r, self.cfg
        hidden = r.hidden[r0:r1]
        dropped = None if mask is None else ~mask.unsqueeze(-1)
        if cfg.student_cap is not None:  # dy/dz = 1 - tanh² = 1 - (y/cap)²
            t2 = logits.div_(cfg.student_cap).square_()
            grad.addcmul_(grad, t2, value=-1.0)
            if dropped is not None:  # their 0 times the derivative at their logits
                grad.masked_fill_(dropped, 0.0)
        if dropped is not None and cfg.need_weight:  # a [rows, H] copy, V times smaller
            hidden = hidden.masked_fill(dropped, 0.0)
        alpha = 1.0 if cfg.student_scale is None else cfg.student_scale
        if cfg.need_hidden:
            out = self.hidden[r0:r1]
            torch.addmm(out, grad, r.weight, beta=0.0, alpha=alpha, out=out)
        if cfg.need_weight:
            _add_mm(self.weight, grad.t(), hidden, alpha, logits, bound)
        if cfg.need_bias:
            self.bias.add_(grad.sum(0, dtype=self.bias.dtype), alpha=alpha)


def _add_mm(
    acc: Tensor, a: Tensor, b: Tensor, alpha: float, spare: Tensor, bound: float | Tensor
) -> None:
    """``acc += alpha·(a @ b)``. A wider ``acc`` (fp32 for bf16/fp16 operands) takes the
    product in blocks of its rows, each rounded once to the operands' dtype in ``spare``'s
    storage (a spent chunk buffer), so no ``acc``-sized temporary exists.

    fp16's range is the catch: ``(a @ b)[i, j]`` sums a whole chunk of rows, up to
    ``bound · sum_r |b[r, j]|`` (``bound`` bounds ``|a|``), and rounded to fp16 it overflowed to
    inf (2,048 rows of hidden 20 at T = 2: 82k), before any ``grad_output`` or loss scale could
    help. Each column ``j`` of ``b`` is scaled by the power of two ``2^-k_j`` that brings that
    bound under 2^15, and the product's column multiplied back in fp32: exact, except for
    entries of ``b`` that become subnormal, far below the column's rounding. bf16 has fp32's
    range and is left as it is."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    back = None  # fp16: the columns' powers of two, to multiply the product back by
    if a.dtype == torch.float16:
        k = b.abs().sum(0, dtype=torch.float32).mul_(bound).div_(2.0**15)
        k = k.log2_().ceil_().clamp_(min=0.0)  # an all-zero column: log2(0) = -inf, then 0
        back = k.exp2()
        b = b.float().div_(back).to(b.dtype)
    rows, cols = acc.shape
    block = min(rows, spare.numel() // max(cols, 1))
    if block < 1 or spare.dtype != a.dtype:
        block = min(rows, max(1, spare.numel() // max(cols, 1)))
        scratch = torch.empty(block, cols, dtype=a.dtype, device=acc.device)
    else:
        scratch = spare.view(-1)[: block * cols].view(block, cols)
    for v0 in range(0, rows, block):
        v1 = min(rows, v0 + block)
        part = torch.mm(a[v0:v1], b, out=scratch[: v1 - v0])
        if back is None:
            acc[v0:v1].add_(part, alpha=alpha)
        else:
            acc[v0:v1].addcmul_(part, back, value=alpha)


# --------------------------------------------------------------------------- implementation


def _reduction_scale(r: _Rows, reduction: str) -> Tensor:
    """What the reduction multiplies the row sum by (0-d fp32; on the device with a mask)."""
    device = r.hidden.device
    factor = 1.0 / r.vocab if reduction == "mean" else 1.0
    if reduction in ("sum", "none"):
        return torch.ones((), dtype=torch.float32, device=device)
    if r.mask is None:
        return torch.full((), factor / max(r.rows, 1), dtype=torch.float32, device=device)
    kept = r.mask.sum(dtype=torch.float32).clamp_(min=1.0)
    return kept.reciprocal_().mul_(factor)


def _forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
    mask: Tensor | None, cfg: _Config,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """``(loss, grad_hidden, grad_weight_acc, grad_bias_acc, scale, stats)``.

    Scalar reductions with a gradient: the three gradients unscaled (as for ``sum``; the hidden
    one in its dtype, the others in their fp32 accumulators) and ``scale`` (0-d fp32, the
    reduction's factor); ``stats`` is empty. ``none`` with a gradient: only ``stats`` (the KD
    op's per-row ``[rows, 4]``) besides the loss. Whatever is not needed is empty."""
    r = _as_rows(
        hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, mask
    )
    per_row = cfg.reduction == "none"
    grads_now = cfg.need_grad and not per_row
    kd_reduction = "none" if per_row else "sum"
    chunks = _Chunker(r, cfg)
    grads = _Grads(r, cfg) if grads_now else None
    f32 = torch.promote_types(hidden.dtype, torch.float32)  # float64 only in tests
    device = hidden.device
    # Per-row losses in the rows' shape, returned as they are: not a view (an in-place op works).
    loss_rows = torch.empty(hidden.shape[:-1], dtype=f32, device=device) if per_row else None
    total = torch.zeros((), dtype=f32, device=device)
    stats = torch.empty(r.rows if cfg.need_grad and per_row else 0, 4, dtype=f32, device=device)
    one = torch.ones((), dtype=f32, device=device)
    temperature = cfg.temperature
    for r0, r1 in chunks.ranges():
        s, t, m = chunks.student(r0, r1), chunks.teacher(r0, r1), chunks.mask(r0, r1)
        need_stats = grads_now or stats.numel() > 0
        loss, st, _ = kd_forward_impl(s, t, m, temperature, kd_reduction, need_stats)
        if loss_rows is not None:
            loss_rows.view(-1)[r0:r1].copy_(loss)
        else:
            total.add_(loss)
        if stats.numel():
            stats[r0:r1].copy_(st)
        if grads is not None:
            empty = st.new_empty(0)
            g = kd_backward_impl(s, t, m, st, empty, one, temperature, "sum")
            grads.fold(g, s, r0, r1, temperature, m)
            del g  # before the next chunk allocates its own
    scale = _reduction_scale(r, cfg.reduction)
    if loss_rows is not None:
        loss_out = loss_rows
    else:
        loss_out = total.mul_(scale) if cfg.reduction != "sum" else total
    if grads is None:
        acc = torch.promote_types(weight.dtype, f32)
        nothing = (hidden.new_empty(0), weight.new_empty(0, dtype=acc), total.new_empty(0))
        return loss_out, *nothing, scale, stats
    grad_h = grads.hidden.view(hidden.shape) if cfg.need_hidden else grads.hidden
    return loss_out, grad_h, grads.weight, grads.bias, scale, stats


def _backward_rows(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher_logits: Tensor | None,
    teacher_hidden: Tensor | None, teacher_weight: Tensor | None, teacher_bias: Tensor | None,
    mask: Tensor | None, stats: Tensor, grad_output: Tensor, cfg: _Config,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``reduction="none"``: the gradients for a per-row ``grad_output``, recomputing each
    chunk's logits; ``(grad_hidden, grad_weight, grad_bias)`` in the inputs' dtypes, empty
    where not needed."""
    r = _as_rows(
        hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias, mask
    )
    chunks = _Chunker(r, cfg)
    grads = _Grads(r, cfg)
    go = _dense(grad_output.reshape(r.rows))
    empty = stats.new_empty(0)
    for r0, r1 in chunks.ranges():
        s, t, m = chunks.student(r0, r1), chunks.teacher(r0, r1), chunks.mask(r0, r1)
        # A masked row's grad_output reaches nothing (an inf there must not size the bound)
        g_out = go[r0:r1] if m is None else go[r0:r1].masked_fill(~m, 0.0)
        g = kd_backward_impl(s, t, m, stats[r0:r1], empty, g_out, cfg.temperature, "none")
        bound = cfg.temperature  # fp16 weights: scaled by the chunk's largest grad_output
        if cfg.need_weight and r.weight.dtype == torch.float16:
            bound = g_out.abs().amax().float() * cfg.temperature
        grads.fold(g, s, r0, r1, bound, m)
        del g  # before the next chunk allocates its own
    grad_h = grads.hidden.view(hidden.shape) if cfg.need_hidden else grads.hidden
    grad_b = grads.bias.new_empty(0)
    if bias is not None and grads.bias.numel():
        grad_b = _round_in_place(grads.bias, bias.dtype)
    return grad_h, _round_in_place(grads.weight, weight.dtype), grad_b


def _round_in_place(acc: Tensor, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """``acc·scale`` rounded once to ``dtype`` in ``acc``'s own storage, which it spends;
    returns the result, a ``dtype`` view of that storage's first bytes, so no second
    ``acc``-sized buffer ever exists (the result keeps the wider storage alive).

    Why the order makes this safe: with ``a = acc.element_size()`` and ``d`` the narrower
    ``dtype``'s (``a >= 2·d``: both are powers of two), output element ``i`` goes to bytes
    ``[d·i, d·(i+1))``, input element ``i`` lives at ``[a·i, a·(i+1))``. Elements are converted
    in blocks ``[i0, i1)`` of increasing ``i0``. The first block (``FIRST_ROUND_BLOCK``
    elements) is converted into a small temporary and copied down after it has been read
    whole. Every later block has ``i1 - i0 <= i0``, so ``d·i1 <= 2·d·i0 <= a·i0``: it writes
    below byte ``a·i0``, i.e. only over input elements ``< i0``, every one of which an earlier
    block has already read, and its output bytes are disjoint from its own input bytes (so the
    conversion is one out-of-place op that never reads a byte it has written). Blocks double
    up to ``ROUND_BLOCK`` elements (on a CPU torch converts through a block-sized fp32
    temporary)."""
    if acc.numel() == 0:  # e.g. a [V, 0] head's weight: the gradient keeps the shape
        return acc.new_empty(acc.shape, dtype=dtype)
    if acc.dtype == dtype:
        return acc if scale is None else acc.mul_(scale)
    assert acc.is_contiguous() and acc.element_size() >= 2 * _itemsize(dtype)
    n = acc.numel()
    src = acc.view(-1)
    dst = src.view(dtype)[:n]

    def convert(i0: int, i1: int, out: Tensor) -> None:
        if scale is None:
            out.copy_(src[i0:i1])
        else:
            torch.mul(src[i0:i1], scale, out=out)

    i1 = min(n, FIRST_ROUND_BLOCK)
    first = torch.empty(i1, dtype=dtype, device=acc.device)
    convert(0, i1, first)
    dst[:i1].copy_(first)
    del first
    i0 = i1
    while i0 < n:
        i1 = min(n, i0 + min(i0, ROUND_BLOCK))
        convert(i0, i1, dst[i0:i1])
        i0 = i1
    return dst.view(acc.shape)


def _rounded_view(acc: Tensor, dtype: torch.dtype) -> Tensor:
    """What ``_round_in_place(acc, dtype)`` returned, recovered from ``acc`` after it ran (the
    view of the storage's first bytes as ``dtype``): a custom op that spends ``acc`` in place
    may not return a view of it, so its caller takes the view."""
    if acc.dtype == dtype:
        return acc
    return acc.view(-1).view(dtype)[: acc.numel()].view(acc.shape)


def _spent_views(
    grad_h: Tensor, acc_w: Tensor, acc_b: Tensor, weight: Tensor, bias: Tensor | None,
    cfg: _Config,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """The gradients ``_spend_grads`` left in the forward's buffers, as views of them."""
    gh = grad_h if cfg.need_hidden else None
    gw = _rounded_view(acc_w, weight.dtype) if cfg.need_weight else None
    gb = None
    if cfg.need_bias and bias is not None:
        gb = _rounded_view(acc_b, bias.dtype)
    return gh, gw, gb


def _spend_grads(
    grad_loss: Tensor, grad_h: Tensor, acc_w: Tensor, acc_b: Tensor, scale: Tensor,
    weight: Tensor, bias: Tensor | None, mask: Tensor | None, cfg: _Config,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """The forward's unscaled gradients times ``grad_output·scale`` in fp32, rounded once (the
    hidden one was rounded once already, by its GEMM), in the forward's own buffers: the
    hidden gradient scaled in place, the accumulators scaled and rounded in place
    (``_round_in_place``), so the backward allocates nothing gradient-sized (the eager
    backward, and the compiled one through ``kasmina::fused_linear_kd_spend_``).

    A masked row's hidden gradient is 0 whatever ``grad_output`` is, as ``kd_kl_loss``'s:
    its factor is 0 rather than ``c`` (its unscaled gradient is 0, and 0·inf would be NaN),
    in the same single pass over the hidden gradient."""
    c = grad_loss.to(torch.float32) * scale
    gh = None
    if cfg.need_hidden:
        # The factor stays fp32, a tensor with dims (a 0-d one would take grad_h's dtype): the
        # product is formed in fp32 and rounded once. Cast to fp16 first, a GradScaler's
        # ``grad_output`` of 65536 (past fp16's 65504) made every row's gradient inf or NaN.
        if mask is None:  # of grad_h's rank (a 1-D hidden: one row)
            rows_c = c.reshape([1] * grad_h.dim())
        else:
            rows_c = torch.where(mask, c, 0.0).unsqueeze(-1)
        gh = grad_h.mul_(rows_c)
    gw = _round_in_place(acc_w, weight.dtype, c) if cfg.need_weight else None
    gb = None
    if cfg.need_bias and bias is not None:
        gb = _round_in_place(acc_b, bias.dtype, c)
    return gh, gw, gb
