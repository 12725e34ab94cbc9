"""POST the file to ``params.url``: 408/429/5xx, timeouts and connection errors are
transient (Retry-After honoured), other 4xx permanent.

``params.url`` must be a public destination unless the operator allows private ones
(``REDRIVE_EXECUTOR_ALLOW_PRIVATE_URLS``; see outbound.py): judged when the template is made,
before the request, and at connect time. A redirect is not followed: it is a permanent error
naming where it pointed. Re-sending (307/308) or dropping (301-303) the body elsewhere is not
what the template said, and the step's Idempotency-Key means nothing to another service.
"""

from __future__ import annotations

import asyncio
import math

import aiohttp

from shared.destinations import Destinations, redact_url
from shared.errors import PermanentError
from services.executor.handlers import outbound
from services.executor.handlers.base import FileRef, StepContext
from services.executor.handlers.checksum import decode_b64
from services.executor.handlers.http_errors import raise_for_status

# Private destinations refused: what a handler called without the operator's choice gets.
PUBLIC_ONLY = Destinations()

BODY_CHARS = 2000
# Read at most this many bytes of the reply: enough for BODY_CHARS of any UTF-8 text, and a
# huge reply cannot blow up the executor's memory.
_BODY_BYTES = 4 * BODY_CHARS


def dependency_of(params: dict, file: FileRef) -> str | None:
    """The host of ``params["url"]``: one circuit breaker per remote service."""
    return outbound.host_of(params.get("url"))


def _url(params: dict, destinations: Destinations) -> str:
    return outbound.checked_url(params.get("url"), destinations, refused="http_call: params.url",
                                needs="http_call needs params.url (an http or https URL)")


def _timeout_s(params: dict) -> float:
    value = params.get("timeout_s", 30)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PermanentError(f"http_call: params.timeout_s must be a positive number, got {value!r}")
    return float(value)


def check_params(params: dict, *, destinations: Destinations = PUBLIC_ONLY) -> None:
    """For a template being made: the same checks as a call's (registry.check_steps)."""
    _url(params, destinations)
    _timeout_s(params)


async def _head(resp: aiohttp.ClientResponse) -> str:
    buf = bytearray()
    while len(buf) < _BODY_BYTES:
        chunk = await resp.content.read(_BODY_BYTES - len(buf))
        if not chunk:
            break
        buf += chunk
    try:
        return bytes(buf).decode(resp.charset or "utf-8", errors="replace")[:BODY_CHARS]
    except LookupError:  # the server named a charset Python does not know
        return bytes(buf).decode("utf-8", errors="replace")[:BODY_CHARS]


async def run(ctx: StepContext, *, destinations: Destinations = PUBLIC_ONLY) -> dict:
    """POST the file's bytes (or its reference as JSON); output ``{"status", "body"}``."""
    url, timeout_s = _url(ctx.params, destinations), _timeout_s(ctx.params)
    # Same key on every retry of this step for this job, so the remote side can dedupe a
    # request whose reply we lost.
    headers = {"Idempotency-Key": f"{ctx.job_id}:{ctx.step_name}"}
    if ctx.file.content_b64 is not None:
        kwargs: dict = {"data": decode_b64(ctx.file.content_b64, "http_call")}
    else:
        kwargs = {"json": {"name": ctx.file.name, "url": ctx.file.url, "size": ctx.file.size}}
    what = f"http_call {redact_url(url)}"
    try:
        async with outbound.client_session(destinations, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            async with session.post(url, headers=headers, allow_redirects=False, **kwargs) as resp:
                if resp.status in outbound.REDIRECT_STATUSES:  # any other 3xx: a permanent HTTP error below
                    target = outbound.redirect_target(resp)
                    to = f" to {redact_url(target)}" if target else ""
                    raise PermanentError(f"{what}: HTTP {resp.status} redirect{to}, not followed "
                                         "(a call goes only to params.url)")
                raise_for_status(resp.status, resp.headers.get("Retry-After"), what)
                return {"status": resp.status, "body": await _head(resp)}
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise outbound.failure("http_call", url, exc) from exc
