"""``kd_kl_loss_reference``: the plain-torch ``kd_kl_loss``, the test oracle of both backends
and the loss inside a compiled ``torch.func`` transform (``kasmina.ops.kd_loss``), with the
reductions both accept (``REDUCTIONS``)."""

from __future__ import annotations

import torch
from torch import Tensor

from kasmina.ops.backend import check_temperature

__all__ = ["REDUCTIONS", "kd_kl_loss_reference"]

REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _denominator(reduction: str, kept: Tensor | int, vocab: int) -> Tensor | int:
    """What ``mean``/``batchmean`` divide by; at least 1 so an all-masked batch gives 0."""
    rows = kept.clamp(min=1) if isinstance(kept, Tensor) else max(kept, 1)
    return rows * vocab if reduction == "mean" else rows


def _reduce(rows: Tensor, reduction: str, kept: Tensor | int, vocab: int) -> Tensor:
    """Apply ``reduction`` to per-row losses; ``kept`` is the number of rows kept by the mask."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / _denominator(reduction, kept, vocab)


def kd_kl_loss_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    mask: Tensor | None = None,
) -> Tensor:
    """Plain-torch ``kd_kl_loss``: the test oracle (differentiable by autograd).

    Computes in at least fp32 and returns that dtype; materialises the probabilities (clarity
    first). ``0 · log 0`` terms (teacher probability exactly 0) count as 0, as in ``F.kl_div``;
    NaN propagates. An unknown ``reduction`` or a temperature outside [1e-18, 1e4] is a
    ``ValueError``, as for the op.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    t_ = check_temperature("temperature", temperature)
    work = torch.promote_types(student_logits.dtype, torch.float32)
    lead = student_logits.shape[:-1]
    vocab = student_logits.shape[-1]
    s = student_logits.to(work).reshape(-1, vocab)
    t = teacher_logits.detach().to(work).reshape(-1, vocab)
    keep = None if mask is None else mask.reshape(-1, 1)
    if keep is not None:  # a dropped row is two equal rows of zeros: its KL is exactly 0 and no
        s, t = s.where(keep, 0.0), t.where(keep, 0.0)  # gradient of it (no shape read: compiles)
    log_ps = torch.log_softmax(s / t_, dim=-1)
    log_pt = torch.log_softmax(t / t_, dim=-1)
    p_t = log_pt.exp()
    kl = torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (log_pt - log_ps)).sum(-1)
    rows = kl * (t_ * t_)
    kept = keep.sum() if keep is not None else rows.numel()
    return _reduce(rows.reshape(lead), reduction, kept, vocab)
