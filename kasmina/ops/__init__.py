"""Fused ops (DESIGN §2): Triton kernels on CUDA, torch references on CPU."""

from kasmina.ops.grad_norms import (
    grad_norms,
    grad_norms_reference,
    leak_check,
    leak_check_reference,
)
from kasmina.ops.lifecycle import (
    lifecycle_tick,
    lifecycle_tick_reference,
    lifecycle_update,
    lifecycle_update_reference,
)

__all__ = [
    "grad_norms",
    "grad_norms_reference",
    "leak_check",
    "leak_check_reference",
    "lifecycle_tick",
    "lifecycle_tick_reference",
    "lifecycle_update",
    "lifecycle_update_reference",
]
