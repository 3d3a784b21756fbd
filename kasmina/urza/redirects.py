"""An HTTP store's redirect to another origin is refused while it would carry the user's headers.

aiohttp (fsspec's HTTP backend) follows a redirect to another origin (scheme, host or port)
dropping only the ``Authorization``, ``Cookie`` and ``Proxy-Authorization`` headers: any other
header a store's settings give (``storage_options={"headers": ...}``, or ``"client_kwargs":
{"headers": ...}``: an ``X-Api-Key``, a token under a name of its own) was sent to the other
host, so a store that redirected elsewhere (or was made to) handed it the user's credentials.
``REDIRECT_GUARD``, a ``TraceConfig`` the client adds to every HTTP store's session, refuses
such a redirect before the next request is sent: the read raises ``UrzaUnavailableError`` (not
retried: the store would only redirect again). A redirect within the store's origin, and one
to another origin that carries no such header (a signed URL, a CDN), is followed as before.

aiohttp is no dependency of Kasmina's own (fsspec's HTTP store needs it), so the client
imports this module only when it opens an HTTP store.
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from yarl import URL

from kasmina.errors import UrzaUnavailableError

logger = logging.getLogger(__name__)

__all__ = ["REDIRECT_GUARD"]

# The headers aiohttp itself drops from a request redirected to another origin.
_DROPPED_ACROSS_ORIGINS = frozenset({"authorization", "cookie", "proxy-authorization"})


def _leaves_origin(url: URL, location: str, requote: bool) -> tuple[bool, str]:
    """Whether a redirect from ``url`` to ``location`` (its ``Location``) may reach another
    origin, and that origin as a message shows it. aiohttp resolves a location without an
    authority against the request's URL and takes one with a scheme and a host as it stands;
    either reading must keep ``url``'s origin, and a location neither resolves counts as
    another origin (aiohttp refuses those too)."""
    try:
        target = URL(location, encoded=not requote)
        readings = [url.join(target)]
        if target.scheme and target.raw_host:
            readings.append(target)
        origins = [reading.origin() for reading in readings]
    except ValueError:
        return True, "a location that does not resolve to an origin"
    origin = url.origin()
    leaving = [other for other in origins if other != origin]
    return bool(leaving), str(leaving[0] if leaving else origin)


async def _on_request_redirect(
    session: aiohttp.ClientSession, context: Any, params: aiohttp.TraceRequestRedirectParams
) -> None:
    """Raise ``UrzaUnavailableError`` for a redirect to another origin that would carry a
    header aiohttp does not drop itself (only the headers' names are shown, never a value)."""
    carried = sorted(
        {name for name in params.headers if name.lower() not in _DROPPED_ACROSS_ORIGINS},
        key=str.lower,
    )
    response = params.response
    location = response.headers.get("Location") or response.headers.get("URI")
    if not carried or location is None:  # aiohttp follows no redirect without a location
        return
    leaving, where = _leaves_origin(params.url, location, session.requote_redirect_url)
    if not leaving:
        return
    plural = "s" if len(carried) > 1 else ""
    message = (
        f"Urza store at {params.url.origin()} answered {response.status} redirecting to {where}, "
        f"another origin; redirect refused, as the request's header{plural} "
        f"{', '.join(carried)} would be sent there (aiohttp drops only Authorization, Cookie "
        "and Proxy-Authorization): give the store's final URL, or serve it from one origin"
    )
    logger.warning("%s", message)
    raise UrzaUnavailableError(message)


def _redirect_guard() -> aiohttp.TraceConfig:
    config = aiohttp.TraceConfig()
    config.on_request_redirect.append(_on_request_redirect)
    return config


# One instance for every client: it holds no state, and fsspec's instance cache (keyed by the
# store's settings as text) keeps sharing one filesystem between clients of the same store.
REDIRECT_GUARD = _redirect_guard()
