"""A store's secrets kept out of every message, log line and ``repr`` (docs/design.md §6).

A store's URL may carry user information (``user:password@``) and a signed URL's query, and its
``storage_options`` tokens and headers; an I/O error's text may quote any of them, and its
``repr`` (an HTTP error's) the request's headers.

- ``redact_urls`` -- every URL in a text with its user information and its query replaced by
  ``***``: how a store's URL is shown.
- ``store_secrets`` -- the secrets a store's settings hold, in every form an error may quote
  them (the user information raw, decoded and as a Basic authorization; each string under a
  secret-like name in ``storage_options``).
- ``redact`` and ``describe_error`` -- a text, or an error by its type and text (never its
  ``repr``), with all of those and any quoted authorization value replaced.

No torch and nothing of the rest of Kasmina: ``KasminaConfig``'s ``repr`` and the CLI use it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["describe_error", "redact", "redact_urls", "store_secrets"]


# A URL's user information (``user:password@``) and its query (a signed URL's token): secrets
# that a store's URL may carry and that no message, log line or ``repr`` may show. The user
# information runs to the authority's last ``@`` (as HTTP clients split it) and may hold a
# quote (a sub-delimiter, legal unencoded); no ``/``, ``?``, ``#`` or space is in it.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
_QUERY = re.compile(r"(://[^\s'\"?#]*)\?[^\s'\"#]*")
# An authorization value an error quotes (a request's headers): its credentials.
_AUTH_VALUE = re.compile(r"(?i)\b(bearer|basic|digest|token)(\s+)[^\s'\",;)]+")
# Names of the store settings (``storage_options``, headers among them) that hold secrets.
_SECRET_NAME = re.compile(r"(?i)key|secret|token|pass|auth|credential|signature|session|cookie")
# Shorter values are not looked for: replacing them everywhere would garble a message.
_MIN_SECRET_CHARS = 4


def redact_urls(text: str) -> str:
    """``text`` with the user information and the query of every URL in it replaced by
    ``***``: a store's URL, or an I/O error's text that quotes one, fit for a log."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", text))


def store_secrets(url: str, storage_options: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The secrets a store's settings hold, as an error's text may quote them: the URL's user
    information (raw, decoded, and as the Basic authorization an HTTP client makes of it) and
    every string under a secret's name in ``storage_options`` (a header's value, and the
    credential after its scheme word), at any depth. Longest first, for :func:`redact`."""
    found: set[str] = set()
    userinfo = _userinfo(url)
    if userinfo:
        user, _, password = userinfo.partition(":")
        plain = f"{unquote(user)}:{unquote(password)}"
        found.update({userinfo, unquote(password), plain})
        for encoding in ("latin-1", "utf-8"):
            try:
                found.add(base64.b64encode(plain.encode(encoding)).decode("ascii"))
            except UnicodeEncodeError:
                continue
    stack: list[tuple[object, bool, int]] = [(storage_options or {}, False, 0)]
    while stack:
        value, secret, depth = stack.pop()
        if isinstance(value, str):
            if secret:
                found.update({value, value.partition(" ")[2].strip()})
        elif depth < 8 and isinstance(value, Mapping):
            for key, item in value.items():
                named = secret or bool(_SECRET_NAME.search(str(key)))
                stack.append((item, named, depth + 1))
        elif depth < 8 and isinstance(value, (list, tuple)):
            stack.extend((item, secret, depth + 1) for item in value)
    found = {text for text in found if len(text) >= _MIN_SECRET_CHARS}
    return tuple(sorted(found, key=len, reverse=True))


def _userinfo(url: str) -> str:
    """A URL's user information: its authority up to the last ``@``. Taken as written where
    ``urlsplit`` refuses the URL (an unbalanced ``[``: a typo'd IPv6 host, or a password with
    a ``[`` in it): the error that reports such a URL must still find its password to redact."""
    if "://" not in url:
        return ""
    try:
        authority = urlsplit(url).netloc
    except ValueError:
        authority = re.split(r"[/?#]", url.partition("://")[2], maxsplit=1)[0]
    return authority.rpartition("@")[0]


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` fit for a log: URLs' credentials and queries (:func:`redact_urls`), the value
    of any authorization it quotes, and each of ``secrets`` (:func:`store_secrets`) replaced by
    ``***``."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return _AUTH_VALUE.sub(r"\1\2***", redact_urls(text))


def describe_error(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """An I/O error as a log line may show it: its type and text, redacted. Its text, not its
    ``repr``: an HTTP error's ``repr`` holds the request's headers, credentials among them."""
    text = str(exc)
    return redact(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, secrets)
