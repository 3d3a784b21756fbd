"""``alpha_blend``'s forward-mode rules (``torch.func.jvp``, ``jacfwd``,
``torch.autograd.forward_ad``): the transposes of its backwards.

``blend``'s backward gives the seed ``alpha*g`` and a tensor alpha ``sum(g*(seed - host))``
(per chunk for a 1-d alpha), the host nothing (it is detached); ``incubate``'s gives ``g`` to
both. Plain torch ops on any device and on ``torch.func``'s wrapper tensors, which the kernels
cannot read.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["blend_tangent", "tangent_sum"]


def tangent_sum(t_seed: Tensor | None, t_host: Tensor | None) -> Tensor | None:
    """``t_seed + t_host`` (a missing tangent is zero): ``incubate``'s tangent, the transpose
    of its backward ``(g, g)``. A copy where only one is given, never the input's tangent."""
    if t_seed is None:
        return None if t_host is None else t_host.clone()
    if t_host is None:
        return t_seed.clone()
    return t_seed + t_host  # fp16/bf16: computed in fp32 and rounded once, as torch's add does


def blend_tangent(
    seed: Tensor | None,
    host: Tensor | None,
    alpha: Tensor | None,
    alpha_value: float,
    t_seed: Tensor | None,
    t_alpha: Tensor | None,
) -> Tensor | None:
    """``blend``'s tangent, the transpose of its backward: ``alpha*t_seed`` plus, for a tensor
    alpha with a tangent, ``t_alpha*(seed - host)`` (per chunk for a 1-d alpha). The host is
    detached, so its tangent adds nothing. Plain torch ops, on any device and on ``torch.func``'s
    wrappers (the kernels need storage); fp32 math for fp16/bf16 data, rounded once."""
    if t_seed is None and t_alpha is None:
        return None
    dtype = (t_seed if t_seed is not None else seed).dtype  # type: ignore[union-attr]
    work = torch.promote_types(dtype, torch.float32)
    c = alpha.numel() if alpha is not None and alpha.dim() == 1 else 0

    def chunked(t: Tensor) -> Tensor:  # ``[..., C, W]``, against a ``[C, 1]`` weight
        return t.unflatten(-1, (c, -1)) if c else t

    def weight(a: Tensor) -> Tensor:
        a = a.to(work)
        return a.unsqueeze(-1) if c else a

    out = None
    if t_seed is not None:  # a float alpha multiplies as an fp32 (opmath) scalar
        a = alpha_value if alpha is None else weight(alpha)
        out = chunked(t_seed.to(work)) * a
    if t_alpha is not None:
        assert seed is not None and host is not None
        term = chunked(seed.to(work) - host.to(work)) * weight(t_alpha)
        out = term if out is None else out + term  # not in place: one may be vmap-batched
    assert out is not None
    return (out.flatten(-2) if c else out).to(dtype)
