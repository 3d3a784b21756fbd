"""Bounded logging: the level for the ``count``-th line of a repeating kind, and text an
untrusted source wrote (a store's manifest, a crafted file) cut to a length fit for a line."""

from __future__ import annotations

import logging


def rarely(count: int, every: int, level: int = logging.WARNING) -> int:
    """``level`` for the first and every ``every``-th occurrence, DEBUG for the rest, so a
    condition that repeats on every step stays visible without flooding the log."""
    return level if count == 1 or count % every == 0 else logging.DEBUG


def clipped(text: str, limit: int, length: int | None = None) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was (``length``: how long what
    it shows is, when that is not ``text`` itself, e.g. a string shown by its repr)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) if length is None else length} characters)"
