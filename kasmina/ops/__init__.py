"""Fused ops (DESIGN §2): Triton kernels on CUDA, torch references on CPU."""

from kasmina.ops.alpha_blend import alpha_blend, alpha_blend_reference
from kasmina.ops.grad_norms import (
    grad_norms,
    grad_norms_reference,
    leak_check,
    leak_check_reference,
)
from kasmina.ops.kd_loss import kd_kl_loss, kd_kl_loss_reference
from kasmina.ops.lifecycle import (
    lifecycle_tick,
    lifecycle_tick_reference,
    lifecycle_update,
    lifecycle_update_reference,
)

__all__ = [
    "alpha_blend",
    "alpha_blend_reference",
    "grad_norms",
    "grad_norms_reference",
    "kd_kl_loss",
    "kd_kl_loss_reference",
    "leak_check",
    "leak_check_reference",
    "lifecycle_tick",
    "lifecycle_tick_reference",
    "lifecycle_update",
    "lifecycle_update_reference",
]
