"""What a slot accepts as a move (``KasminaLayer._apply``: ``.to``, ``.double()``, ``.half()``).

A seed's kernel runs through ``alpha_blend`` and the guard's kernels, which take only
``SUPPORTED_DTYPES``; ``attach`` refuses a float64 host for that reason. A move that would
put a slot holding a kernel in another floating dtype is refused the same way, before the slot
moves (modules the model moved before reaching the slot have moved: PyTorch's ``_apply``
walks the model module by module). A slot whose seeds hold no kernel moves freely.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kasmina.ops.backend import SUPPORTED_DTYPES

__all__ = ["check_move"]


def check_move(slot: nn.Module, fn: Any) -> None:
    """``ValueError`` if ``fn`` (what ``nn.Module._apply`` applies to every tensor) turns a
    floating tensor into a dtype outside ``SUPPORTED_DTYPES`` while a seed of ``slot`` (a
    ``KasminaLayer``) holds a kernel. ``fn`` is tried on an empty tensor: no copy, no host read."""
    if all(seed._modules.get("kernel") is None for seed in slot.seeds):
        return
    probe = torch.empty(0, device=slot._finite_flags.device)
    try:
        dtype = fn(probe).dtype
    except Exception:  # noqa: BLE001 - not a dtype move we can judge: PyTorch's own errors follow
        return
    if dtype.is_floating_point and dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(
            f"{slot.layer_id}: a seed holds a kernel, which runs in {names} only; moving the "
            f"slot to {dtype} is refused (nothing of the slot moved; modules moved before it "
            "have: move the model back, e.g. model.float())"
        )
