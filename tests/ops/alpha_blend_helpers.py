"""Inputs and independent float64 math of the ``alpha_blend`` tests (test_alpha_blend_*.py)."""

from __future__ import annotations

import torch

# Not multiples of the 4096-element block, and a last dim divisible by the chunk counts used.
SHAPE = (3, 5, 420)
ALPHA_KINDS = ("float", "0-d", "chunks")


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    seed_out = torch.randn(shape, generator=gen).to(dtype)
    host_out = torch.randn(shape, generator=gen).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    return seed_out, host_out, grad


def _alpha(kind: str, last_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 100)
    if kind == "float":
        return 0.3125
    if kind == "0-d":
        return torch.rand((), generator=gen)
    chunks = 6 if last_dim % 6 == 0 else 1
    return torch.rand(chunks, generator=gen)


def _alpha64(alpha, last_dim: int) -> torch.Tensor:
    """Independent per-column expansion: column j belongs to chunk j // (D // C)."""
    if not isinstance(alpha, torch.Tensor):
        return torch.tensor(alpha, dtype=torch.float64)
    a = alpha.double()
    if a.dim() == 0:
        return a
    width = last_dim // a.numel()
    return torch.stack([a[j // width] for j in range(last_dim)])


def _blend64(seed_out, host_out, alpha) -> torch.Tensor:
    a = _alpha64(alpha, seed_out.shape[-1])
    return a * seed_out.double() + (1 - a) * host_out.double()


def _strided(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Fresh random values of ``shape`` behind a non-contiguous layout."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "transposed":
        return (
            torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen)
            .to(dtype)
            .transpose(-1, -2)
        )
    if kind == "sliced":
        wide = torch.randn(*shape[:-1], 2 * shape[-1] + 3, generator=gen).to(dtype)
        return wide[..., 3::2]
    if kind == "expanded":  # one row broadcast over the leading dims: stride 0
        return torch.randn(shape[-1], generator=gen).to(dtype).expand(shape)
    raise AssertionError(kind)


def _alpha_view(kind: str, chunks: int, seed: int) -> torch.Tensor:
    """A per-chunk alpha as a view: every other element, an offset, or one value expanded."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "step-2":
        return torch.rand(2 * chunks + 1, generator=gen)[1::2]
    if kind == "offset":
        return torch.rand(chunks + 3, generator=gen)[3:]
    return torch.rand(1, generator=gen).expand(chunks)
