"""Backend choice for the fused ops: Triton on CUDA, the torch reference on CPU.

``KASMINA_BACKEND=triton`` forces the Triton kernels for CPU tensors too; that only works with
``TRITON_INTERPRET=1`` set before triton is imported, and is how CI proves every kernel on a CPU.
The interpreter truncates fp32 -> bf16 stores toward zero where a GPU rounds to nearest, so a
bf16 output there can differ from the reference by one bf16 ulp (the tests allow for it).
``KASMINA_BACKEND=reference`` forces the reference everywhere (debugging).
"""

from __future__ import annotations

import functools
import os

import torch

from kasmina.utils.checks import check_positive

_VALID = ("auto", "triton", "reference")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Raw ``KASMINA_BACKEND`` values already parsed (a few at most: only valid ones are kept).
_PARSED: dict[str | None, str] = {}


def backend() -> str:
    """The requested backend, read on every call so tests can switch it (the variable is
    parsed once per distinct value: every op's dispatch asks)."""
    raw = os.environ.get("KASMINA_BACKEND")
    value = _PARSED.get(raw)
    if value is not None:
        return value
    value = (raw or "auto").strip().lower() or "auto"
    if value not in _VALID:
        raise ValueError(f"KASMINA_BACKEND must be one of {_VALID}, got {value!r}")
    if len(_PARSED) < 64:
        _PARSED[raw] = value
    return value


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton is a Linux dependency
        return False
    return True


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device) -> bool:
    """Whether an op on ``device`` should run its Triton kernel (never on ``meta`` tensors,
    which have no storage to launch on: their shapes come from the reference)."""
    choice = backend()
    if choice == "reference" or device.type == "meta":
        return False
    if device.type == "cuda":
        return triton_available()
    if choice == "triton":
        if not interpreter_enabled():
            raise ValueError(
                "KASMINA_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before "
                "triton is imported"
            )
        return triton_available()
    return False


def through_dispatcher() -> bool:
    """Whether an op's call must go through its custom op: while ``torch.compile`` or
    ``torch.jit.trace`` traces (which records the op as one node; through the eager path it
    would record neither a kernel launch nor the value a host read branched on), or under a
    mode that traces or fakes tensors (``FakeTensorMode``, ``make_fx``'s proxy mode,
    functionalization), whose tensors the eager paths (kernel launches on storage, host reads
    of a value) cannot take. Any other dispatch mode (``FlopCounterMode``, a user's logging
    mode) sees the eager path's own aten ops, as without the mode."""
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        return True
    if torch._C._len_torch_dispatch_stack() == 0:
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(mode, _tracing_modes()) for mode in _get_current_dispatch_mode_stack())


@functools.cache
def _tracing_modes() -> tuple[type, ...]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import FunctionalTensorMode
    from torch.fx.experimental.proxy_tensor import ProxyTorchDispatchMode

    return (FakeTensorMode, FunctionalTensorMode, ProxyTorchDispatchMode)


def check_float_tensor(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    """Clear ``ValueError`` for a wrong dtype, device or a non-contiguous layout."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def saveable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a tensor autograd may save for a backward. A teacher run under
    ``torch.inference_mode()`` hands over inference tensors, which autograd refuses to save:
    such a tensor is copied out of inference mode (one copy, only then); any other is ``t``.
    TorchDynamo cannot trace the test, so a compiled caller passes tensors made outside
    inference mode (``t.clone()`` outside the compiled region)."""
    if t is None or torch.compiler.is_compiling():
        return t
    return t.clone() if t.is_inference() else t


def traced_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Python number as a 0-d tensor input of a custom op while compiling: a float argument
    is guarded by its value, so a schedule (an alpha ramp, a temperature) recompiled at every
    new value until ``fullgraph`` raised at the recompile limit. ``ones().mul(value)``, where
    ``scalar_tensor``, ``full`` and ``tensor`` guard the value too. float64 holds any float
    exactly (a temperature); a blend's alpha is float32 as the seeds' are."""
    return torch.ones((), dtype=dtype, device=device).mul(value)


# The temperatures the KD ops take. Below: the loss is the row sums scaled by T²·ln 2 in fp32,
# which is subnormal below T of about 1.3e-19 (the loss 7e-6 off at T = 1e-20, exactly 0 below
# about 1e-22 while the gradient stayed right; T = 1e-18 is exact to fp32), and the logits' scale
# log2(e)/T overflows below about 4e-39. Above: logits differing by d give a KL of about (d/T)²/2,
# which fp32 rounding swamps once (d/T)² is below its epsilon; scaled by T², that noise is the
# loss (T = 1e18 gave -3e17, T = 1e20 inf or NaN); for logits spanning tens the loss value is
# already a few % off at T = 1e3 (the gradient stays within about 1e-3), as eager fp32's is.
# ``KDConfig`` keeps a seed's KD to [1e-3, 1e3].
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-18, 1e4


def check_temperature(name: str, value: object) -> float:
    """``value`` (see ``check_positive``) if within [``MIN_TEMPERATURE``, ``MAX_TEMPERATURE``],
    else ``ValueError`` naming ``name``: a temperature whose fp32 factors are finite and normal."""
    value = check_positive(name, value)
    if not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
        raise ValueError(
            f"{name} must be within [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {value!r}"
        )
    return value
