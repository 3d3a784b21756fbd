"""Triton kernels for ``alpha_blend``'s ``blend`` mode: ``out = alpha*seed + (1-alpha)*host``.

The op is memory-bound, so each direction is one launch over the flat element range with large
vectorised blocks (``BLOCK`` elements per program), fp32 math after the loads and one rounding
on the store. ``alpha`` arrives in one of three forms (``ALPHA_MODE``):

* 0 — a Python float passed as a kernel scalar: no tensor, no host sync;
* 1 — a one-element device tensor, loaded once per program (a 0-d schedule tensor stays on the
  device, so nothing waits on the host);
* 2 — per-chunk ``alpha[C]``: element ``i`` sits in column ``i % D`` of the last dim and uses
  ``alpha[col // W]`` with ``W = D // C``. The column is computed in int32 from one int64
  remainder per program, so the per-element index math stays cheap.

Backward writes ``grad_seed = alpha*g`` in one launch. When alpha needs a gradient,
``sum(g*(seed-host))`` is reduced without atomics: a scalar alpha gets one fp32 partial per
program (summed by torch afterwards); a per-chunk alpha uses a 2-D kernel whose programs stride
over rows accumulating per-column sums in registers, writing one ``[D]`` row of partials each
(a few hundred rows at most), which torch folds to ``[C]``. Results are deterministic.

Launchers take optional preallocated outputs (tests poison them to catch unwritten elements).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from kasmina.kernels.device import on_device

BLOCK = 4096  # elements per program in the flat kernels (16 per thread at 8 warps)
NUM_WARPS = 8
CHUNK_BLOCK_R = 8  # rows per step of the per-chunk alpha-gradient kernel
CHUNK_BLOCK_D = 512  # columns per program of that kernel


@triton.jit
def _alpha_for(
    alpha_ptr, alpha_value, start, mask, D, W, ALPHA_MODE: tl.constexpr, BLOCK: tl.constexpr
):
    """Alpha for the ``BLOCK`` elements starting at flat index ``start`` (int64)."""
    if ALPHA_MODE == 0:
        a = alpha_value
    elif ALPHA_MODE == 1:
        a = tl.load(alpha_ptr).to(tl.float32)
    else:
        col = (start % D).to(tl.int32) + tl.arange(0, BLOCK)
        col = col % D
        a = tl.load(alpha_ptr + col // W, mask=mask, other=0.0).to(tl.float32)
    return a


@triton.jit
def _blend_fwd_kernel(
    seed_ptr, host_ptr, alpha_ptr, out_ptr, alpha_value, N, D, W,
    ALPHA_MODE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(seed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(host_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = _alpha_for(alpha_ptr, alpha_value, start, mask, D, W, ALPHA_MODE, BLOCK)
    out = a * s + (1.0 - a) * h
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _blend_bwd_kernel(
    grad_ptr, seed_ptr, host_ptr, alpha_ptr, dseed_ptr, partial_ptr, alpha_value, N, D, W,
    ALPHA_MODE: tl.constexpr, ALPHA_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = _alpha_for(alpha_ptr, alpha_value, start, mask, D, W, ALPHA_MODE, BLOCK)
    tl.store(dseed_ptr + offs, (a * g).to(dseed_ptr.dtype.element_ty), mask=mask)
    if ALPHA_GRAD:  # scalar alpha: one partial per program
        s = tl.load(seed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(host_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + pid, tl.sum(g * (s - h), axis=0))


@triton.jit
def _blend_bwd_chunked_kernel(
    grad_ptr, seed_ptr, host_ptr, alpha_ptr, dseed_ptr, partial_ptr, R, D, W,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per-chunk alpha with gradient: view ``[R, D]``; program (i, j) owns columns block i and
    rows j*BLOCK_R, j*BLOCK_R + step, ... and writes ``partial[j, cols]``."""
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    step = tl.num_programs(1) * BLOCK_R
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    a = tl.load(alpha_ptr + cols // W, mask=cmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in range(pid_r * BLOCK_R, R, step):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        mask = (rows < R)[:, None] & cmask[None, :]
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dseed_ptr + offs, (a[None, :] * g).to(dseed_ptr.dtype.element_ty), mask=mask)
        s = tl.load(seed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(host_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * (s - h)
    tl.store(partial_ptr + pid_r.to(tl.int64) * D + cols, tl.sum(acc, axis=0), mask=cmask)


# --------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=16)
def _program_target(device: torch.device) -> int:
    """About four programs per SM: enough to saturate memory, few partial rows to fold."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _alpha_layout(x: torch.Tensor, alpha: torch.Tensor | None) -> tuple[int, int, int]:
    """``(ALPHA_MODE, D, W)`` for ``x`` and ``alpha`` (see the module docstring)."""
    if alpha is None:
        return 0, 1, 1
    if alpha.numel() == 1:
        return 1, 1, 1
    d = x.shape[-1]
    if x.dim() == 0 or d % alpha.numel() != 0 or d >= 2**30:
        raise ValueError(f"per-chunk alpha of length {alpha.numel()} does not fit {tuple(x.shape)}")
    return 2, d, d // alpha.numel()


def _dense_alpha(alpha: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """``alpha`` as the kernels read it: element k at ``alpha_ptr + k``.

    A strided or expanded per-chunk view (``a[::2]``, ``a0.expand(C)``) would otherwise be read
    as the wrong elements or past its allocation; the copy is C elements.
    """
    if alpha is None:
        return None
    if alpha.device != like.device:
        raise ValueError(f"alpha is on {alpha.device}, expected {like.device}")
    return alpha.contiguous()


def _check(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.device != like.device or not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous with shape {tuple(like.shape)} on {like.device}, got "
            f"shape {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})"
        )


def _outputs(
    like: torch.Tensor, out: torch.Tensor | None, name: str, alpha: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int, int]]:
    """``out`` (allocated when None) checked against ``like``, ``alpha`` as the kernels read it
    (``_dense_alpha``), and its layout (``_alpha_layout``)."""
    if out is None:
        out = torch.empty_like(like)
    _check(name, out, like)
    alpha = _dense_alpha(alpha, like)
    return out, alpha, _alpha_layout(like, alpha)


def blend_forward(
    seed: torch.Tensor,
    host: torch.Tensor,
    alpha: torch.Tensor | None,
    alpha_value: float,
    *,
    out: torch.Tensor | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """``alpha*seed + (1-alpha)*host`` in the inputs' dtype (``alpha=None``: ``alpha_value``)."""
    _check("host", host, seed)
    _check("seed", seed, seed)
    out, alpha, (mode, d, w) = _outputs(seed, out, "out", alpha)
    n = seed.numel()
    if n:
        with on_device(seed.device):
            _blend_fwd_kernel[(triton.cdiv(n, block),)](
                seed, host, seed if alpha is None else alpha, out, float(alpha_value), n, d, w,
                ALPHA_MODE=mode, BLOCK=block, num_warps=NUM_WARPS,
            )  # fmt: skip
    return out


def blend_backward(
    grad: torch.Tensor,
    seed: torch.Tensor | None,
    host: torch.Tensor | None,
    alpha: torch.Tensor | None,
    alpha_value: float,
    *,
    grad_seed_out: torch.Tensor | None = None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha*grad, grad_alpha)``; ``grad_alpha = sum(grad*(seed-host))`` reduced to
    ``alpha.shape`` when ``seed``, ``host`` and ``alpha`` are all given, else an empty tensor."""
    with on_device(grad.device):
        _check("grad", grad, grad)
        grad_seed_out, alpha, (mode, d, w) = _outputs(grad, grad_seed_out, "grad_seed_out", alpha)
        n = grad.numel()
        alpha_arg = grad if alpha is None else alpha
        want_alpha = seed is not None and host is not None and alpha is not None
        if not want_alpha:
            if n:
                _blend_bwd_kernel[(triton.cdiv(n, block),)](
                    grad, grad, grad, alpha_arg, grad_seed_out, grad_seed_out, float(alpha_value),
                    n, d, w, ALPHA_MODE=mode, ALPHA_GRAD=False, BLOCK=block, num_warps=NUM_WARPS,
                )  # fmt: skip
            return grad_seed_out, grad.new_empty(0)
        _check("seed", seed, grad)
        _check("host", host, grad)
        if n == 0:
            return grad_seed_out, torch.zeros_like(alpha)
        if mode == 1:
            programs = triton.cdiv(n, block)
            partial = torch.empty(programs, device=grad.device, dtype=torch.float32)
            _blend_bwd_kernel[(programs,)](
                grad, seed, host, alpha, grad_seed_out, partial, 0.0, n, d, w,
                ALPHA_MODE=1, ALPHA_GRAD=True, BLOCK=block, num_warps=NUM_WARPS,
            )  # fmt: skip
            return grad_seed_out, partial.sum().to(alpha.dtype).reshape(alpha.shape)
        rows = n // d
        col_blocks = triton.cdiv(d, CHUNK_BLOCK_D)
        row_programs = max(
            1, min(triton.cdiv(rows, CHUNK_BLOCK_R), _program_target(grad.device) // col_blocks)
        )
        partial = torch.empty((row_programs, d), device=grad.device, dtype=torch.float32)
        _blend_bwd_chunked_kernel[(col_blocks, row_programs)](
            grad, seed, host, alpha, grad_seed_out, partial, rows, d, w,
            BLOCK_R=CHUNK_BLOCK_R, BLOCK_D=CHUNK_BLOCK_D, num_warps=NUM_WARPS,
        )  # fmt: skip
        grad_alpha = partial.view(row_programs, alpha.numel(), w).sum(dim=(0, 2))
        return grad_seed_out, grad_alpha.to(alpha.dtype)
