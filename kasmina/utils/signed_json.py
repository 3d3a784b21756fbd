"""JSON for signed documents: one canonical encoding, and a strict parser.

A signature covers bytes, while code reads fields. Both line up only if every writer produces the
same bytes for the same fields and a reader accepts nothing a writer would not produce, so Urza
manifests and checkpoint manifests share these two functions: ``canonical_json`` (sorted keys,
no whitespace, ASCII only, no NaN) and ``strict_json_loads`` (duplicate keys and the non-standard
constants ``NaN``/``Infinity`` are errors, since either would let two readers see different
fields behind one signature; so is a number literal whose float is not finite, ``1e400``, which
read as ``inf`` and could not be written back: ``canonical_json`` refuses it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["canonical_json", "finite_number", "strict_json_loads"]


def canonical_json(fields: Mapping[str, Any]) -> bytes:
    """The one encoding a signature covers: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def strict_json_loads(text: str, *, allow_nan: bool = False) -> Any:
    """``json.loads`` that raises ``ValueError`` on a duplicate key, a NaN/Infinity or a number
    past a float's range (``1e400``; unless ``allow_nan``: a document that is not signed and may
    hold a NaN score), or nesting deeper than the interpreter's recursion limit (the parser
    recurses per level: 200 KB of ``[`` is enough, and what reads a file from a store must
    refuse it, not crash)."""
    constant = {} if allow_nan else {"parse_constant": _reject_constant, "parse_float": _finite}
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, **constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def finite_number(value: object) -> bool:
    """Whether ``value`` is an int or float (not a bool) with a finite float value: a JSON
    integer past a float's range (``10**400``) is not one (``float()`` raises OverflowError)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        raise ValueError("duplicate key")
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name}")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # an overflowing literal: the inf an Infinity would give
        raise ValueError(f"non-finite number {literal:.40}")
    return value
