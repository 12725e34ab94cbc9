"""The aiohttp application, built from its dependencies (bootstrap.py makes them).

Middlewares, outermost first: trace (the request's W3C trace, for its logs and the calls
it makes), metrics (every answer counted, errors included), errors
(anything raised becomes our error JSON), auth (the key → a Principal). Routes come from
the tables in routes.py; nothing here connects to anything.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from nats.aio.client import Client as NatsClient
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import tracing
from shared.db import ping
from shared.messages import ServiceError, dumps
from shared.round_trip import RoundTrip
from shared.rpc import RpcClient
from services.gateway.auth import Authenticate, auth_middleware, bearer_key, existing_tenant, principal_of
from services.gateway.errors import errors_middleware
from services.gateway.events import EventHub
from services.gateway.identity import KeyCache, Principal, authenticate
from services.gateway.openapi import openapi_document
from services.gateway.large_bodies import LargeBodies
from services.gateway.routes import LOCAL_ROUTES, ROUTES, API, forwarder, public_paths
from services.gateway.system_metrics import SystemMetrics

DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"
PLACEHOLDER = ("<!doctype html><title>redrive</title><h1>redrive</h1>"
               "<p>The dashboard is not installed. The API is at <a href='/api/v1/openapi.json'>/api/v1/openapi.json</a>.</p>")
READY_TIMEOUT_S = 3.0


async def _db_answers(engine) -> bool:
    try:
        return await asyncio.wait_for(ping(engine), READY_TIMEOUT_S)
    except asyncio.TimeoutError:
        return False
# The page's own inline <script> and <style> blocks (no src: an external script is 'self').
_INLINE = re.compile(r"<(script|style)(?![^>]*\bsrc\s*=)[^>]*>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)


@dataclass
class Deps:
    nc: NatsClient | None
    engine: AsyncEngine | None
    rpc: RpcClient | None
    hub: EventHub | None
    keys: KeyCache = field(default_factory=KeyCache)  # serves nothing until a KeyRevocations trusts it
    idempotency_lease_s: float = 35.0  # longer than any live request (a few RPC timeouts)
    max_body_bytes: int = 64 * 1024 * 1024  # REDRIVE_MAX_REQUEST_BYTES
    # How many bodies larger than a bus message are read at once (REDRIVE_MAX_CONCURRENT_LARGE_BODIES).
    large_bodies: LargeBodies = field(default_factory=LargeBodies)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    system: SystemMetrics | None = None  # breakers and consumer backlogs, read per scrape
    # REDRIVE_METRICS_TOKEN: when set, GET /metrics needs "Authorization: Bearer <it>".
    metrics_token: str | None = None
    round_trip: RoundTrip = field(default_factory=lambda: RoundTrip(None))  # /readyz's NATS check


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry, hub: EventHub | None) -> None:
        self.requests = Counter("redrive_http_requests_total", "HTTP requests answered",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("redrive_http_request_seconds", "HTTP request latency",
                                 ["method", "route"], registry=registry)
        if hub is not None:
            Gauge("redrive_sse_clients", "Connected live-event clients", registry=registry).set_function(
                lambda: hub.clients)

    def middleware(self):
        @web.middleware
        async def metrics(request: web.Request, handler) -> web.StreamResponse:
            started = time.perf_counter()
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"  # ids never become labels
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            finally:
                self.requests.labels(request.method, route, str(status)).inc()
                self.latency.labels(request.method, route).observe(time.perf_counter() - started)

        return metrics


@web.middleware
async def trace_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The request's trace: the caller's ``traceparent`` when it sends a valid one, else a
    new one. Its log lines carry it, its calls to services continue it, and a run it
    creates belongs to it (shared/tracing.py)."""
    trace_id = tracing.trace_id_of(request.headers.get(tracing.HEADER)) or tracing.new_trace_id()
    with tracing.bound(trace_id):
        return await handler(request)


def _json(data, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """As every API answer is written (compact, shared.messages.dumps), not aiohttp's json.dumps."""
    return web.Response(status=status, body=dumps(data), content_type="application/json", headers=headers)


def build_app(deps: Deps) -> web.Application:
    async def who(key: str) -> Principal | None:
        return await authenticate(deps.engine, key, deps.keys)

    metrics = HttpMetrics(deps.registry, deps.hub)
    app = web.Application(
        middlewares=[trace_middleware, metrics.middleware(), errors_middleware, auth_middleware(who, public_paths())],
        client_max_size=deps.max_body_bytes,
    )
    # Every GET answers HEAD too (RFC 9110 asks it of general-purpose servers; uptime
    # checks use it), but the live event stream, which would hold the connection open.
    for route in ROUTES:
        handler = forwarder(route, deps.rpc, deps.engine, deps.idempotency_lease_s, deps.large_bodies)
        if route.method == "GET":
            app.router.add_get(API + route.path, handler)
        else:
            app.router.add_route(route.method, API + route.path, handler)
    handlers = _local_handlers(deps, who)
    for local in LOCAL_ROUTES:
        if local.method == "GET":
            app.router.add_get(local.path, handlers[local.name], allow_head=local.name != "events")
        else:
            app.router.add_route(local.method, local.path, handlers[local.name])
    return app


def inline_hashes(html: str) -> dict[str, list[str]]:
    """CSP sources (``'sha256-…'``) of each inline ``<script>`` and ``<style>`` of a page, by
    tag: what a browser hashes is the element's text, its line ends normalised to LF."""
    found: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(html):
        text = body.replace("\r\n", "\n").replace("\r", "\n")
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        found[tag.lower()].append(f"'sha256-{digest}'")
    return found


def dashboard_headers(html: str) -> dict[str, str]:
    """What the dashboard is sent with: it may not be framed (its buttons act: Continue,
    Recover, Cancel…), and runs no script or style but its own inline blocks, by hash."""
    hashes = inline_hashes(html)
    policy = "; ".join([
        "default-src 'self'",
        "script-src " + (" ".join(hashes["script"]) or "'none'"),
        "style-src " + (" ".join(hashes["style"]) or "'none'"),
        "connect-src 'self'",
        "img-src 'self' data:",  # the page's favicon is data:,
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "object-src 'none'",
        "form-action 'self'",
    ])
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _metrics_token_matches(request: web.Request, token: str) -> bool:
    """Compared in constant time (hashes of equal length, whatever was sent)."""
    sent = bearer_key(request)
    return hmac.compare_digest(hashlib.sha256(sent.encode("utf-8", "surrogatepass")).digest(),
                               hashlib.sha256(token.encode()).digest())


class StreamKey:
    """An event stream's API key, checked again as the request that opened the stream was
    (``who``: the same authenticate, the same KeyCache). Every change of a key that the
    gateway hears (key_revocations.py) evicts it from that cache and so moves the cache's
    generation, as does emptying it (on losing or regaining the listening connection):
    that is the change :meth:`changed` sees, with no I/O."""

    def __init__(self, who: Authenticate, key: str, principal: Principal, keys: KeyCache) -> None:
        self._who = who
        self._key = key
        self._principal = principal
        self._keys = keys
        # None: checked at once, in case the key changed between its check at the request
        # and the stream's start.
        self._checked_generation: int | None = None

    def changed(self) -> bool:
        return self._checked_generation != self._keys.generation

    async def still_valid(self) -> bool:
        # Read before the lookup: a change heard while it is on its way is checked next time.
        self._checked_generation = self._keys.generation
        # The same principal: revoked or deleted, or given another role or tenant, the key no
        # longer stands for what the stream was opened with (a new stream is checked afresh).
        return await self._who(self._key) == self._principal


def _local_handlers(deps: Deps, who: Authenticate) -> dict:
    document = openapi_document()
    # Read once, at start: the page served is the page hashed (it is part of the install).
    page = DASHBOARD.read_bytes() if DASHBOARD.is_file() else PLACEHOLDER.encode()
    page_headers = dashboard_headers(page.decode())
    page_etag = hashlib.sha256(page).hexdigest()[:32]

    async def events(request: web.Request) -> web.StreamResponse:
        principal = principal_of(request)
        tenant_id = await existing_tenant(request, principal, deps.engine)
        key_check = StreamKey(who, bearer_key(request), principal, deps.keys)
        return await deps.hub.stream(request, tenant_id, principal.key_id, key_check)

    async def me(request: web.Request) -> web.Response:
        # What a client (the dashboard) offers depends on the role; the API decides every action again.
        principal = principal_of(request)
        tenant_id = await existing_tenant(request, principal, deps.engine)
        return _json({"tenant_id": tenant_id, "key_tenant_id": principal.tenant_id, "role": principal.role,
                                  "user": principal.user, "key_id": principal.key_id})

    async def openapi(request: web.Request) -> web.Response:
        return _json(document)

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        # A round trip, not only a connection: a hung server (stopped, its disk stalled)
        # keeps the socket open while every request to it times out.
        nats_ok, db_ok = await asyncio.gather(deps.round_trip.answers(READY_TIMEOUT_S), _db_answers(deps.engine))
        checks = {"nats": nats_ok, "database": db_ok}
        ready = all(checks.values())
        if ready:
            return _json({"ready": True, "checks": checks})
        # As every 503 of the API: when to ask again (load balancers and clients honour it).
        return _json({"ready": False, "checks": checks}, status=503, headers={"Retry-After": "2"})

    async def metrics(request: web.Request) -> web.Response:
        # Public unless the operator set a token (its labels name tenants and dependencies,
        # and each scrape asks the services): checked before anything is asked.
        if deps.metrics_token is not None and not _metrics_token_matches(request, deps.metrics_token):
            raise ServiceError("unauthorized", "this gateway's /metrics needs its token "
                                               "(Authorization: Bearer <REDRIVE_METRICS_TOKEN>)")
        if deps.system is not None:
            await deps.system.refresh()
        return web.Response(body=generate_latest(deps.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dashboard(request: web.Request) -> web.StreamResponse:
        if any(tag.value == page_etag for tag in request.if_none_match or ()):
            response = web.Response(status=304, headers=page_headers)
        else:
            response = web.Response(body=page, content_type="text/html", charset="utf-8", headers=page_headers)
        response.etag = page_etag
        return response

    return {"events": events, "me": me, "openapi": openapi, "healthz": healthz, "readyz": readyz, "metrics": metrics,
            "dashboard": dashboard}
