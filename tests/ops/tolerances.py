"""Per-dtype tolerances for comparing fused ops with their float64 references: one place."""

import torch

TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES[dtype]
