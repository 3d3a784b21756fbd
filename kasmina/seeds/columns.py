"""The values of the state table's non-stage columns (docs/design.md §3): a fraction (alpha, gate
score, performance threshold) as the int32 column holds it, ``SCALE`` times over, and an artifact
id as its BLUEPRINT_ID hash. ``GPUStateTensor``'s setters and a seed's saved state check a value
here, before it is written.
"""

from __future__ import annotations

import numbers
import zlib

from kasmina.ops.lifecycle import INT32_MAX

__all__ = ["SCALE", "blueprint_hash", "fixed_point", "real"]

SCALE = 1000  # fractions (alpha, gate score, performance threshold): int32 column * 1000


def blueprint_hash(artifact_id: str) -> int:
    """A stable non-negative int32 for the table's BLUEPRINT_ID column."""
    return zlib.crc32(artifact_id.encode("utf-8")) & 0x7FFFFFFF


def real(name: str, value: float) -> float:
    """``value`` if it is a real number, else a ``TypeError`` naming ``name``: None, a str or a
    tensor failed in a comparison or in ``round``, naming nothing. A float is asked first (the
    setters' common case, a seed's alpha at every GRAFTING step: the ABC check is slower)."""
    if type(value) is not float and (
        isinstance(value, bool) or not isinstance(value, numbers.Real)
    ):
        raise TypeError(f"{name} must be a real number (a float), got {type(value).__name__}")
    return value


def fixed_point(fraction: float, name: str = "") -> int:
    """``fraction`` as its int32 column holds it (* ``SCALE``): a ``TypeError`` if it is no real
    number (``real``), a ``ValueError`` if the column cannot hold it; each names ``name``."""
    real(name or "the value", fraction)
    if not -(2**31) / SCALE <= fraction <= INT32_MAX / SCALE:  # NaN, inf; before the product
        said = f"{name} " if name else ""  # built here: a seed's alpha passes every GRAFTING step
        raise ValueError(
            f"{said}must be within +-{INT32_MAX / SCALE} (int32 * {SCALE}), got {fraction}"
        )
    return round(fraction * SCALE)
