"""Per-tensor L2 norms of many tensors and the gradient-leak flag (docs/design.md §2).

The isolation monitor asks "did any host gradient move?" after every seed backward, and gradient
clipping asks for the norms of every parameter gradient: both over hundreds to thousands of
tensors. The Triton path reads every tensor once in one launch per dtype; the flag stays on the
device so the check never stalls the training loop.

The ops are ``torch.library`` custom ops (``kasmina::grad_norms``, ``kasmina::leak_check``) so
``torch.compile(fullgraph=True)`` treats them as single opaque nodes. Outside compilation the
public functions call the same implementation directly: boxing a list of a thousand tensors
through the dispatcher costs more than the kernels themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat
from operator import is_not

import numpy as np
import torch
from torch.autograd import forward_ad as _forward_ad
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from kasmina.ops.backend import SUPPORTED_DTYPES, through_dispatcher, use_triton
from kasmina.ops.transforms import functorch_active
from kasmina.utils.checks import check_real
from kasmina.utils.grad_modes import in_grad_mode

MaybeTensors = Sequence[torch.Tensor | None]


def _norms_of(tensors: MaybeTensors, device: torch.device, exact: bool = False) -> torch.Tensor:
    """fp32 ``[len]`` norms by ``torch._foreach_norm``; ``None`` gives 0 (no validation here).

    One C++ loop over the tensors (what ``clip_grad_norm_`` uses); ``dtype=float32`` upcasts
    fp16/bf16 before squaring. Grad mode off (``in_grad_mode``): no ``detach()`` per tensor. A
    ``None`` entry becomes an empty tensor (norm 0) in place, so the result is one ``stack`` with no
    index tensor built from Python ints: the Python work per tensor is a pointer compare.
    Squares in fp32 underflow and overflow, so norms that may have lost range are recomputed
    in float64 (``_repair``); off the CPU, where that choice would need a host read, and when
    ``exact`` (a trace, which would keep only the branch a trace-time read chose), every norm is
    computed in float64.
    """
    ts = tensors if isinstance(tensors, list) else list(tensors)
    empty = None
    if not all(map(is_not, ts, repeat(None))):
        empty = torch.zeros(0, device=device, dtype=torch.float32)  # whatever the default dtype
        ts = [empty if t is None else t for t in ts]
    if not ts:
        return torch.zeros(0, device=device, dtype=torch.float32)

    def norms() -> torch.Tensor:
        if device.type != "cpu" or exact:
            return torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)).float()
        found = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))
        if found.device.type == "cpu":  # else the caller rejects the list
            _repair(found, ts, empty)
        return found

    return in_grad_mode(False, norms)  # (not a ``no_grad`` block: ``in_grad_mode``)


# An fp32 norm >= 2^-31 that is finite lost nothing to range. Overflow: squares are >= 0, so an
# overflowing square or partial sum leaves +inf, never a finite result. Underflow: each square
# loses at most 2^-126 (even with denormals flushed), so n elements lose at most n * 2^-126 of a
# sum of squares >= 2^-62, a relative error <= n * 2^-64, under fp32's own 2^-24 for every
# n <= 2^40. Below the threshold (exact zeros included), at +inf, or NaN, the norm is recomputed
# in float64, whose squares of fp32/fp16/bf16 values neither underflow nor overflow.
_TRUSTED = 2.0**-31
_FP32_MAX = float(np.finfo(np.float32).max)


def _repair(norms: torch.Tensor, ts: list[torch.Tensor], empty: torch.Tensor | None) -> None:
    """Recompute in float64, in place, the CPU norms that fp32 squaring may have got wrong.

    Costs a min and a max over the norms when none is suspect (the usual case; NaN propagates
    into both), and otherwise one float64 pass over the suspect tensors only (never the empty
    stand-ins for ``None``). The norms are read through a numpy view: right after the pass over
    the data, numpy's small reductions cost less than torch's (about 0.1 ms per call).
    """
    values = norms.numpy()
    if values.min() >= _TRUSTED and values.max() < math.inf:
        return
    suspect = np.flatnonzero(~((values >= _TRUSTED) & (values < math.inf))).tolist()
    idx = [i for i in suspect if ts[i] is not empty]
    if idx:
        exact = torch._foreach_norm([ts[i] for i in idx], 2, dtype=torch.float64)
        norms[idx] = torch.stack(exact).float()


def grad_norms_reference(tensors: MaybeTensors) -> torch.Tensor:
    """fp32 L2 norm of each tensor; ``None`` and empty tensors give 0, NaN/Inf propagate."""
    return _norms_of(tensors, _infer_device(tensors, None))


def leak_check_reference(
    tensors: MaybeTensors, tol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, flag)``: flag is a 0-d bool, True if any norm exceeds ``tol`` or is not finite."""
    norms = grad_norms_reference(tensors)
    return norms, _flag(norms, _check_tol(tol))


def _flag(norms: torch.Tensor, tol: float) -> torch.Tensor:
    # NaN fails every comparison, so ``not (norm <= tol)`` catches it too; +inf exceeds any tol
    # once tol is at most the norms' largest finite value: compared with an fp32 tensor, a
    # Python float rounds to fp32 (1e39 to inf, and ``inf <= inf``), so it is capped first.
    return (norms <= min(tol, torch.finfo(norms.dtype).max)).logical_not_().any()


def _infer_device(tensors: MaybeTensors, device: torch.device | str | None) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        # The first tensor's device type before anything reads ``dev``'s: else a CPU build
        # answers ``device="cuda"`` with torch's "not compiled with CUDA", not the mismatch.
        first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
        if first is not None and first.device.type != dev.type:
            i = next(i for i, t in enumerate(tensors) if t is first)
            raise ValueError(f"tensors[{i}] is on {first.device}, expected {dev}")
        if dev.type == "cuda" and dev.index is None:  # compare equal to the tensors' devices
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
    for i, t in enumerate(tensors):
        if isinstance(t, torch.Tensor):
            return t.device
        if t is not None:  # before any ``.device`` read: the documented error, not AttributeError
            raise ValueError(f"tensors[{i}] must be a Tensor or None, got {type(t).__name__}")
    return torch.device("cpu")


def check_entry(i: int, t: object, device: torch.device) -> None:
    """``ValueError`` unless ``tensors[i]`` (not ``None``) is a supported tensor on ``device``:
    the contract of both backends, which the Triton launcher also runs on every list it has
    not prepared before (``kasmina.kernels.grad_norms.prepare``), before its own pointer check."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"tensors[{i}] must be a Tensor or None, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"tensors[{i}] must be float32, float16 or bfloat16, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"tensors[{i}] is on {t.device}, expected {device}")
    if t.layout != torch.strided:
        raise ValueError(f"tensors[{i}] must be a dense (strided) tensor, got {t.layout}")
    if is_traceable_wrapper_subclass(t):  # no storage of its own: the CPU path died in numpy
        raise ValueError(
            f"tensors[{i}] is a {type(t).__name__}, a tensor subclass wrapping other tensors: "
            "measure the plain tensors it holds (a DTensor's to_local())"
        )


def _validate(tensors: MaybeTensors, device: torch.device) -> None:
    """``ValueError`` naming the first entry that is not a supported tensor on ``device``."""
    if not isinstance(tensors, (list, tuple)):
        raise ValueError(f"tensors must be a list or tuple, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if t is not None:
            check_entry(i, t, device)


def _checked_norms(tensors: MaybeTensors, device: torch.device) -> torch.Tensor:
    """The CPU path's norms, validated without a Python pass in the common case.

    ``_foreach_norm(..., dtype=float32)`` itself refuses every dtype but fp32/fp16/bf16 (ints,
    bool, float64 and complex as narrowing or non-float, float8 as unpromotable), ``stack``
    refuses mixed devices, and a list wholly on another device shows in the result's device.
    Any of those, or an entry that is not a tensor, sends the call through ``_validate``, which
    raises the ``ValueError`` that names the entry; the pre-check is only the container type.
    Off the CPU (the reference forced onto another device, for debugging) the norms are taken
    in float64, which would accept float64 inputs, so the list is validated first there.
    """
    if not isinstance(tensors, (list, tuple)):
        raise ValueError(f"tensors must be a list or tuple, got {type(tensors).__name__}")
    if device.type != "cpu":  # float64 there accepts float64 inputs: check the list first
        _validate(tensors, device)
    try:
        norms = _norms_of(tensors, device)
    except (RuntimeError, TypeError, AttributeError):
        _validate(tensors, device)
        raise
    if norms.device != device:
        _validate(tensors, device)
    return norms


def _check_tol(tol: object) -> float:
    """``tol`` as a float: a real number (``check_real``: not a bool, a string or a tensor),
    finite and >= 0 (``0 <= tol < inf`` also refuses NaN), rounded down to the nearest fp32:
    the norms are fp32 and compared with an fp32 tol, and one rounded up onto a norm
    (0.99999999 to 1.0) would hide that norm exceeding it."""
    given = tol
    try:
        tol = float(check_real("tol", tol))
    except OverflowError:  # an int past float's range (10**400)
        tol = math.inf
    if not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a finite number >= 0, got {given!r:.40}")
    low = np.float32(min(tol, _FP32_MAX))
    if float(low) > tol:
        low = np.nextafter(low, np.float32(0.0))
    return float(low)


def _compute(
    tensors: MaybeTensors, device: torch.device, tol: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if use_triton(device):
        from kasmina.kernels.grad_norms import tensor_norms

        # Validates (``check_entry``, then the data pointers) whenever it prepares a new launch.
        return tensor_norms(tensors, device, tol, check_entry)
    norms = _checked_norms(tensors, device)
    return norms, (None if tol is None else _flag(norms, tol))


@torch.library.custom_op("kasmina::grad_norms", mutates_args=())
def _grad_norms_op(tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    return _compute(tensors, device, None)[0]


@_grad_norms_op.register_fake
def _grad_norms_fake(tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    _validate(tensors, device)
    return torch.empty(len(tensors), dtype=torch.float32, device=device)


@torch.library.custom_op("kasmina::leak_check", mutates_args=())
def _leak_check_op(
    tensors: list[torch.Tensor | None], tol: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    norms, flag = _compute(tensors, device, _check_tol(tol))
    assert flag is not None
    return norms, flag


@_leak_check_op.register_fake
def _leak_check_fake(
    tensors: list[torch.Tensor | None], tol: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(tensors, device)
    _check_tol(tol)
    norms = torch.empty(len(tensors), dtype=torch.float32, device=device)
    return norms, torch.empty((), dtype=torch.bool, device=device)


def _inputs(tensors: MaybeTensors, use_grad: bool, op: str) -> list[torch.Tensor | None]:
    """The tensors to measure. Not under a ``torch.func`` transform, whose wrapped tensors the
    CPU path cannot read (an internal error there, another per backend): ``RuntimeError``
    naming ``op``. Under forward-mode AD, detached: the norms have no tangent (the reference
    path's ``_foreach_norm`` raised on a dual input where the kernel's ignored it)."""
    if isinstance(tensors, torch.Tensor):  # iterating it would silently measure its rows
        raise ValueError("tensors must be a sequence of tensors, not a single Tensor")
    if functorch_active():
        raise RuntimeError(
            f"{op} does not run under a torch.func transform (grad, vmap, ...): its norms are "
            "not differentiable; measure the tensors outside the transformed function"
        )
    if use_grad:
        try:
            found = [None if t is None else t.grad for t in tensors]
        except AttributeError:
            _infer_device([None if isinstance(t, torch.Tensor) else t for t in tensors], None)
            raise
    else:
        found = list(tensors)
    return _detached(found) if _forward_ad._current_level >= 0 else found


def _traced(tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """The norms under ``torch.jit.trace``, in torch ops it records: its tracer cannot record
    the ops' ``Tensor?[]`` argument, and would record neither a kernel launch (its output
    uninitialised at replay) nor the host read that picks the CPU path's float64 repair."""
    _validate(tensors, device)
    return _norms_of(_detached(tensors), device, exact=True)


def _detached(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The norms are not differentiable: keep autograd (and AOTAutograd) out of the op."""
    return [t.detach() if isinstance(t, torch.Tensor) else t for t in tensors]


def grad_norms(
    tensors: MaybeTensors, *, use_grad: bool = False, device: torch.device | str | None = None
) -> torch.Tensor:
    """fp32 ``[len(tensors)]`` L2 norms on the tensors' device (not differentiable).

    ``use_grad=True`` measures each tensor's ``.grad`` instead (``None`` grads count as 0).
    ``device`` is only needed when every entry is ``None``; it defaults to the first tensor's.
    Tensors must be float32/float16/bfloat16 on one device, else ``ValueError``.
    """
    ts = _inputs(tensors, use_grad, "grad_norms")
    dev = _infer_device(ts, device)
    if through_dispatcher():  # tracing too: the tracer cannot record the op (``_traced``)
        traced = torch.jit.is_tracing()
        return _traced(ts, dev) if traced else _grad_norms_op(_detached(ts), dev)
    return _compute(ts, dev, None)[0]


def leak_check(
    tensors: MaybeTensors,
    tol: float = 0.0,
    *,
    use_grad: bool = False,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norms, flag)`` where ``flag`` is a 0-d bool device tensor, left on the device.

    ``flag`` is True when any norm exceeds ``tol`` (finite, >= 0) or is NaN/Inf. Reading it
    (``bool(flag)``) is the caller's one synchronisation point.
    """
    ts = _inputs(tensors, use_grad, "leak_check")
    dev = _infer_device(ts, device)
    if through_dispatcher():  # tracing too: the tracer cannot record the op (``_traced``)
        if torch.jit.is_tracing():
            norms = _traced(ts, dev)
            return norms, _flag(norms, _check_tol(tol))
        return _leak_check_op(_detached(ts), _check_tol(tol), dev)
    norms, flag = _compute(ts, dev, _check_tol(tol))
    assert flag is not None
    return norms, flag
