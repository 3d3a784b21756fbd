"""Argument types shared by the standalone perf scripts: a count that must be at least 1 is
refused by argparse with a usage message, not met later as an empty median or a division."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An ``int >= 1`` (argparse ``type=``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value
