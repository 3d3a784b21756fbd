"""Checks of one setting's value for ``KasminaConfig``: each returns the value in its
canonical form (a path absolute, a number a float, ids a tuple) or raises naming the setting.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from kasmina.urza.keys import TrustedPublishers
from kasmina.utils.checks import check_real

__all__ = ["absolute_path", "bounded_number", "id_tuple", "optional_path", "publisher_keys"]


def publisher_keys(value: object) -> dict[str, str]:
    """``urza_trusted_publishers`` validated (key ids, 32-byte Ed25519 public keys) and in its
    canonical form (base64). A bare string is refused, never read as a list of key ids."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Mapping):
        raise ValueError(
            "urza_trusted_publishers must be a mapping of key id -> public key, got "
            f"{type(value).__name__} {value!r:.40}"
        )
    try:
        return TrustedPublishers(value).to_json()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"urza_trusted_publishers: {exc}") from None


def optional_path(name: str, value: object) -> str | None:
    """None, or a non-empty path (a ``str`` or ``os.PathLike``) as an absolute string, as
    ``runs_root`` (a relative checkpoint key file read at the first checkpoint, after a chdir,
    was created anew in the other directory, and the run refused its own checkpoints); "" is
    refused rather than read as unset, and a number is never a path."""
    if value is None:
        return None
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str) or not path:
        raise ValueError(
            f"{name} must be None or a path (a non-empty str or os.PathLike), got {value!r}"
        )
    return absolute_path(name, path)


def absolute_path(name: str, path: str) -> str:
    """``path`` with ``~`` expanded, made absolute; a ``ValueError`` naming the setting when the
    OS cannot take it (``~nobody``: no such home, a RuntimeError from pathlib)."""
    if "\0" in path:
        raise ValueError(f"{name} {path!r:.80} cannot be used: it holds a NUL character")
    try:
        return str(Path(path).expanduser().absolute())
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"{name} {path!r:.80} cannot be used: {exc}") from None


def bounded_number(name: str, value: object, rule: str, fits: Callable[[float], bool]) -> float:
    """``value`` (``check_real``) if it ``fits``, else a ``ValueError`` saying that ``name``
    must be ``rule``, whatever ``value`` is (NaN fits no comparison)."""
    try:
        number = check_real(name, value)
    except ValueError:
        number = math.nan
    if not fits(number):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return number


def id_tuple(name: str, value: object) -> tuple[str, ...]:
    """A sequence of non-empty ids as a tuple; a bare string is refused, since ``tuple("ctl")``
    would silently mean the ids "c", "t" and "l"."""
    if isinstance(value, (str, bytes)):
        raise TypeError(
            f"{name} must be a sequence of key ids, not the single string {value!r} "
            f"(write [{value!r}] for one id)"
        )
    try:
        ids = tuple(value)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of key ids, got {value!r}") from None
    if not all(isinstance(k, str) and k for k in ids):
        raise ValueError(f"{name} must hold non-empty strings, got {ids!r}")
    return ids
