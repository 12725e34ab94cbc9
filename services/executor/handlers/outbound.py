"""Requests the built-in handlers make where a tenant says (``http_call``'s ``params.url``, a
``download``'s url): to public destinations only, unless the operator allows private ones
(``REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS``), and failures told without secrets or whole replies.

A destination is judged by :mod:`shared.destinations`, as webhooks are:

* up front, from the URL alone (a literal private address, ``localhost``, a malformed host):
  aiohttp connects to a literal address without asking any resolver;
* at connect time, by the session's resolver, which drops non-public addresses: a name that
  resolves only to private ones (or starts to, DNS rebinding) is refused there;
* at each redirect: aiohttp is never left to follow one (it would connect to a literal private
  address in a ``Location`` without a check). :func:`get` follows them itself, judging each
  hop like the first; ``http_call`` does not follow them at all (see there).

Each refusal is a :class:`PermanentError`: the file ends ERROR and is never retried.

Messages name a URL as :func:`shared.destinations.redact_url` shows it (no ``user:pass@``, no
query string) and quote at most a short, printable excerpt of what came back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from shared.destinations import Destinations, NonPublicAddress, printable, redact_url
from shared.errors import PermanentError, RedriveError, TransientError, is_transient_http_status

MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
EXCERPT_CHARS = 200


def host_of(url: object) -> str | None:
    """The URL's host, for its circuit breaker; None for what is no URL (the handler's own
    check then says what is wrong with it: this runs before it)."""
    try:
        return urlsplit(url).hostname if isinstance(url, str) else None
    except ValueError:  # an unclosed IPv6 bracket, a netloc that NFKC normalisation changes…
        return None


def checked_url(url: object, destinations: Destinations, *, needs: str, refused: str) -> str:
    """``url`` when it is an http(s) URL that may be requested; PermanentError saying why not.
    ``needs`` opens the message for a URL that is none (``"http_call needs params.url …"``),
    ``refused`` the one for a destination refused (``"http_call: params.url"``)."""
    try:
        parts = urlsplit(url) if isinstance(url, str) else None
        usable = parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. an unclosed IPv6 bracket or a port that is no number
        usable = False
    if not usable:
        shown = repr(redact_url(url)) if isinstance(url, str) else printable(repr(url), 100)
        raise PermanentError(f"{needs}, got {shown}")
    refusal = destinations.refusal(url)
    if refusal is not None:
        raise PermanentError(f"{refused} {refusal}")
    return url


@asynccontextmanager
async def client_session(destinations: Destinations, **kwargs) -> AsyncIterator[aiohttp.ClientSession]:
    """A session whose connections go only where ``destinations`` allows (its resolver)."""
    resolver = destinations.resolver()
    connector = aiohttp.TCPConnector(resolver=resolver) if resolver is not None else None
    try:
        async with aiohttp.ClientSession(connector=connector, **kwargs) as session:
            yield session
    finally:
        if resolver is not None:  # ours, not the connector's, to close
            await resolver.close()


def redirect_target(resp: aiohttp.ClientResponse) -> str | None:
    """Where a 3xx answer points (its ``Location`` against the request URL); None without one."""
    location = resp.headers.get("Location")
    if not location:
        return None
    try:
        return str(resp.url.join(URL(location)))
    except (ValueError, TypeError):
        return location  # judged, and shown redacted, as it stands


@asynccontextmanager
async def get(session: aiohttp.ClientSession, url: str, destinations: Destinations, *, what: str,
              headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url``, following up to MAX_REDIRECTS redirects, each target judged before it is
    requested; yields the first answer that is not a redirect. Files are often served from
    a CDN or object store a redirect points to (signed URLs): refusing every redirect would
    break ordinary downloads. The same headers (Range, If-Range) go to each hop; credentials
    in the first URL do not follow a redirect to another URL."""
    first = url
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(url, headers=headers, allow_redirects=False) as resp:
            target = redirect_target(resp) if resp.status in REDIRECT_STATUSES else None
            if target is None:
                yield resp
                return
            hop = f"{what} {redact_url(url)}: HTTP {resp.status} redirect"
            checked_url(target, destinations, needs=f"{hop} to a URL that is not http(s)",
                        refused=f"{hop} to {redact_url(target)} refused: its url")
        url = target
    raise PermanentError(f"{what} {redact_url(first)}: more than {MAX_REDIRECTS} redirects")


def failure(what: str, url: str, exc: BaseException) -> RedriveError:
    """The error a failed request is, in words safe to show the tenant: a refused destination
    and a reply that is no HTTP (a raw TCP service's banner) are permanent; a timeout, a
    refused connection or a reply cut short are transient."""
    where = f"{what} {redact_url(url)}"
    said = printable(str(exc), EXCERPT_CHARS)
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, NonPublicAddress):
        return PermanentError(f"{where}: refused: {printable(str(exc.os_error), EXCERPT_CHARS)}")
    if isinstance(exc, aiohttp.InvalidURL):  # its text is the whole URL
        return PermanentError(f"{what}: invalid url {redact_url(url)}")
    if isinstance(exc, aiohttp.ClientResponseError) and exc.status == 400 and not isinstance(exc, aiohttp.TooManyRedirects):
        # aiohttp's own parser refusing the answer (the handlers judge real statuses with
        # http_errors.raise_for_status): no server said 400, and the same server says it again.
        return PermanentError(f"{where}: the answer is not valid HTTP ({printable(exc.message, EXCERPT_CHARS)})")
    if isinstance(exc, aiohttp.ClientResponseError):  # its text carries the whole URL: say the message only
        said = f"{exc.status}, {printable(exc.message, EXCERPT_CHARS)}"
        cls = TransientError if is_transient_http_status(exc.status) else PermanentError
        return cls(f"{where}: {type(exc).__name__}: {said}")
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError)):
        return TransientError(f"{where}: {type(exc).__name__}: {said}".rstrip(": "))
    return PermanentError(f"{where}: {type(exc).__name__}: {said}".rstrip(": "))
