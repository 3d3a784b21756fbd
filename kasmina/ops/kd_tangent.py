"""``kd_kl_loss``'s forward-mode rule (``torch.func.jvp``, ``jacfwd``,
``torch.autograd.forward_ad``): the transpose of its backward.

The backward gives the student ``c·(p_s - p_t)·grad_output`` with ``c = T·scale`` (the
reduction's ``1/(rows_kept·V)``, ``1/rows_kept`` or 1) and the teacher nothing, masked rows 0.
So a student tangent ``t`` moves the loss by ``c·Σ_v (p_s - p_t)·t`` per row, summed over the
rows unless the reduction is ``none``; a teacher tangent moves it by nothing (the op detaches
the teacher). Plain torch ops in the loss's dtype (fp32, or float64 for float64 logits), on
any device and on ``torch.func``'s wrapper tensors, which the kernels cannot read.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kd_loss_tangent", "probability_difference"]

LOG2E = 1.4426950408889634


def probability_difference(
    student: Tensor, teacher: Tensor, stats: Tensor, temperature: float
) -> Tensor:
    """``p_s - p_t`` (``[..., V]``, the stats' dtype) from the kernels' per-row statistics
    ``(-M_a, -M_b, Z_a, Z_b)``: ``p = 2^((x - M)·k)/Z`` with ``k = log2(e)/T``, the exponents
    formed as the backward forms them (the difference off the row's maximum first)."""
    work = stats.dtype
    k = LOG2E / temperature
    neg_ma, neg_mb, z_a, z_b = stats.split(1, -1)
    p_s = torch.exp2((student.to(work) + neg_ma) * k) / z_a
    p_t = torch.exp2((teacher.to(work) + neg_mb) * k) / z_b
    return p_s - p_t


def kd_loss_tangent(
    diff: Tensor,
    tangent: Tensor,
    mask: Tensor | None,
    scale: Tensor | None,
    factor: float,
    reduction: str,
) -> Tensor:
    """The loss's tangent for a student tangent ``tangent``: ``Σ_v diff·tangent`` per row
    (``diff = p_s - p_t``), times ``factor`` (``T`` times the reduction's scale known on the
    host) and the device-side ``scale`` (``1/rows_kept``, when a mask meets ``mean`` or
    ``batchmean``; empty or None otherwise), summed over the rows unless ``reduction`` is
    ``none``. A masked row gives exactly 0, whatever its tangent holds (an infinity there
    would make ``0·inf`` NaN), as the backward gives its gradient exactly 0."""
    rows = (diff * tangent.to(diff.dtype)).sum(-1)
    if mask is not None:
        rows = torch.where(mask, rows, 0.0)
    rows = rows * factor
    out = rows if reduction == "none" else rows.sum()
    return out * scale if scale is not None and scale.numel() > 0 else out
