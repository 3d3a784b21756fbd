"""Checks of scalar arguments and settings: one rule for every entry that takes a number.

Each check returns the value as a plain Python ``int`` or ``float`` and raises ``ValueError``
naming the argument otherwise. A bool (an ``int`` subclass, NumPy's too) is never a number here,
nor is a string (``float("0.5")`` would take one) or a tensor. A NumPy number, a ``Fraction`` or
an ``IntEnum`` is taken as its Python value: kept as it is, such a value failed a Triton launch,
``Tensor * Fraction``, or a checkpoint's ``torch.load(weights_only=True)`` (which refuses a
NumPy scalar). Under ``torch.compile`` a ``SymInt``/``SymFloat`` passes as it is, compared
without ``math.isfinite`` (which TorchDynamo cannot take through a symbolic float).

Neither torch nor NumPy is imported here: a controller that signs commands checks its settings
without loading them (a value of theirs only exists once they are loaded).
"""

from __future__ import annotations

import numbers
import operator
import sys

__all__ = ["check_int", "check_non_negative", "check_positive", "check_positive_int", "check_real"]

_FLOAT_MAX = sys.float_info.max
_BOOL_DTYPES = ("bool", "torch.bool")  # a NumPy bool's and a bool tensor's ``str(dtype)``


def _symbolic(value: object, floats: bool = True) -> bool:
    """Whether ``value`` is a ``SymInt`` (or a ``SymFloat``, with ``floats``). Such a value only
    exists once torch is loaded, so this never loads it."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(value, (torch.SymInt, torch.SymFloat) if floats else torch.SymInt)


def _is_bool(value: object) -> bool:
    """A bool, a NumPy bool or a bool tensor: never a number here."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in _BOOL_DTYPES


def check_real(name: str, value: object) -> float:
    """``value`` if it is a real number: a plain ``int`` or ``float`` (a ``SymFloat`` under
    ``torch.compile``) as it is, any other ``numbers.Real`` (a NumPy number, a ``Fraction``, an
    ``IntEnum``) as a Python ``float``. NaN and infinities pass (the callers bound them)."""
    if type(value) in (int, float) or _symbolic(value):
        return value  # type: ignore[return-value]
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a float, got {type(value).__name__}")
    try:
        return float(value)  # type: ignore[arg-type]
    except OverflowError:  # Fraction(10**400)
        raise ValueError(f"{name} must be a float, got {value!r:.40}") from None


def check_positive(name: str, value: object) -> float:
    """``value`` (see ``check_real``) if finite and > 0. The test is ``0 < value <= max``
    (NaN fails it), which also refuses an int past a float's range (float math fails on it)."""
    value = check_real(name, value)
    if not 0 < value <= _FLOAT_MAX:
        raise ValueError(f"{name} must be finite and > 0, got {value!r:.40}")
    return value


def check_non_negative(name: str, value: object) -> float:
    """``value`` (see ``check_real``) if finite and >= 0 (as ``check_positive``, 0 included)."""
    value = check_real(name, value)
    if not 0 <= value <= _FLOAT_MAX:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r:.40}")
    return value


def check_int(name: str, value: object, least: int, most: int | None = None) -> int:
    """``value`` as an int in [``least``, ``most``]: an int or an integer of another library
    (NumPy: anything with ``__index__``), never a bool or a float. Without ``most``, an int past
    a float's range is refused too (a count meets a float somewhere). An int is compared as it
    is: so is a symbolic size under ``torch.compile``, which TorchDynamo sees as an int and could
    not take through the ``getattr`` probe below."""
    if type(value) is int or _symbolic(value, floats=False):
        count = value
    elif _is_bool(value):
        count = None
    else:
        try:
            count = operator.index(value)  # type: ignore[arg-type]
        except TypeError:  # no integer (a float, a string), or a float tensor's __index__
            count = None
    if count is not None and least <= count:
        if most is not None and count <= most:
            return count  # type: ignore[return-value]
        if most is None and (type(count) is not int or count <= _FLOAT_MAX):
            return count  # type: ignore[return-value]
    want = f">= {least}" if most is None else f"in [{least}, {most}]"
    raise ValueError(f"{name} must be an int {want}, got {value!r:.40}")


def check_positive_int(name: str, value: object) -> int:
    """``check_int(name, value, 1)``: a count of things to make or to run (``attach``'s seeds
    and chunk size, a measurement's repeats, a seed's fault limit)."""
    return check_int(name, value, 1)
