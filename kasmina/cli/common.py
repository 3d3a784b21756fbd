"""Helpers shared by the CLI's subcommands: the program name, the one error type a command
raises for a clean one-line failure, argument parsers, and a print to stdout that any path
survives (``say``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

__all__ = [
    "PROG",
    "CLIError",
    "bounded_int",
    "non_negative_int",
    "one_line",
    "positive_int",
    "redacted",
    "say",
    "shown_store",
]


PROG = "kasmina"


class CLIError(Exception):
    """A user mistake, reported as one line."""


def positive_int(text: str) -> int:
    """An argparse type for a count of at least 1; argparse names the option."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type for a count that may be 0; argparse names the option."""
    return _int_at_least(text, 0, "0 or more")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    value = _as_int(text)
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _as_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def bounded_int(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (of ``unit``, as the error names
    it); argparse names the option."""

    def parse(text: str) -> int:
        value = _as_int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}{unit}, got {value}")
        return value

    return parse


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text


def say(text: str) -> None:
    """Print ``text`` on stdout, each character its encoding cannot take written as its
    backslash escape, as stderr writes it: a line quoting a path or an id given in bytes that
    are not UTF-8 (a lone surrogate in ``str``) raised ``UnicodeEncodeError`` on a strict
    stdout, and the command stopped at that line."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))


def shown_store(url: str) -> str:
    """A store's URL as a message shows it: its user information (``user:password@``) and its
    query (a signed URL's token) replaced by ``***``, as the Urza client shows it."""
    from kasmina.urza.redaction import redact_urls

    return redact_urls(url)


def redacted(text: str, store: str) -> str:
    """``text`` (an error's, which may quote the store's URL or its credentials) fit for a
    message about the store ``store``: URLs' credentials and queries, and the secrets ``store``
    holds (its user information, raw, decoded and as a Basic authorization), replaced by
    ``***``, as the Urza client's own messages are."""
    from kasmina.urza.redaction import redact, store_secrets

    return redact(text, store_secrets(store, None))
