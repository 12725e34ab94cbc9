"""Who is asking, and for which tenant.

The middleware turns ``Authorization: Bearer <key>`` into a :class:`Principal` (401
otherwise); handlers then ask :func:`require_role` and :func:`effective_tenant`. A
platform admin acts on another tenant with ``X-Tenant-Id``; anyone else naming a tenant
other than their own gets 403.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from sqlalchemy.ext.asyncio import AsyncEngine

from shared.messages import ServiceError
from services.gateway.identity import Principal, tenant_exists

PRINCIPAL = web.RequestKey("principal", Principal)
TENANT_HEADER = "X-Tenant-Id"

Authenticate = Callable[[str], Awaitable[Principal | None]]


def bearer_key(request: web.Request) -> str:
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def auth_middleware(authenticate: Authenticate, public_paths: frozenset[str]):
    """Every matched route needs a key except ``public_paths`` (canonical route paths).
    Unmatched requests fall through to the router's 404/405 without asking for a key."""

    @web.middleware
    async def auth(request: web.Request, handler) -> web.StreamResponse:
        match = request.match_info
        if match.http_exception is not None or match.route.resource is None:
            return await handler(request)
        if match.route.resource.canonical in public_paths:
            return await handler(request)
        key = bearer_key(request)
        principal = await authenticate(key) if key else None
        if principal is None:
            raise ServiceError("unauthorized", "a valid API key is required (Authorization: Bearer <key>)")
        request[PRINCIPAL] = principal
        return await handler(request)

    return auth


def principal_of(request: web.Request) -> Principal:
    return request[PRINCIPAL]


def require_role(principal: Principal, role: str) -> None:
    if not principal.at_least(role):
        raise ServiceError("forbidden", f"this action needs the {role} role", {"role": principal.role, "needs": role})


def asked_tenant(request: web.Request) -> str | None:
    return request.headers.get(TENANT_HEADER, "").strip() or None


def effective_tenant(request: web.Request, principal: Principal) -> str:
    """The tenant the request acts on: the key's own, or X-Tenant-Id for a platform admin."""
    asked = asked_tenant(request)
    if asked is None or asked == principal.tenant_id:
        return principal.tenant_id
    if principal.role != "platform_admin":
        raise ServiceError("forbidden", "only a platform admin may act for another tenant")
    # Tenant ids are short printable ASCII; a header's non-UTF-8 bytes arrive as surrogates,
    # which the message bus cannot encode (that was a 500).
    if len(asked) > 64 or not (asked.isascii() and asked.isprintable()):
        raise ServiceError("validation_error", "X-Tenant-Id is not a tenant id",
                           {"fields": {TENANT_HEADER: "at most 64 printable ASCII characters"}})
    return asked


async def existing_tenant(request: web.Request, principal: Principal, engine: AsyncEngine) -> str:
    """:func:`effective_tenant`, refused as not found when a platform admin names a tenant
    that does not exist: a mistyped X-Tenant-Id would otherwise make templates and runs
    for nobody, or stream nobody's events."""
    tenant_id = effective_tenant(request, principal)
    if tenant_id != principal.tenant_id and not await tenant_exists(engine, tenant_id):
        raise ServiceError("not_found", f"tenant {tenant_id} was not found", {"id": tenant_id})
    return tenant_id
