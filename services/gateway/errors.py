"""Every error leaves the gateway as ``{"error": {"code", "message", "details"}}`` with a
status chosen here from the owning service's code; never a stack trace.

Codes not listed are the services' rule violations (``run_completed``,
``nothing_to_retry``, ``step_not_optional``, …): 400.
"""

from __future__ import annotations

from typing import Any

import structlog
from aiohttp import web

from shared.db import is_transient_db_error
from shared.errors import TransientError
from shared.messages import ServiceError, dumps

log = structlog.get_logger(__name__)

STATUS_BY_CODE = {
    "bad_request": 400,
    "unauthorized": 401,
    "insufficient_credits": 402,
    "forbidden": 403,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "run_running": 409, "run_not_recoverable": 409, "conflict": 409, "file_pending": 409,
    "idempotency_in_progress": 409,
    "payload_too_large": 413,
    "too_many_requests": 429,  # a per-key or per-tenant cap (live event streams)
    "response_too_large": 500,
    "validation_error": 422, "idempotency_key_reused": 422,
    "internal": 500,
    "unknown_verb": 501,  # a service older than this gateway (mid-upgrade): retrying later may help
    "service_unavailable": 503, "dependency_unavailable": 503,
}
RETRY_AFTER_S = "2"
RETRY_AFTER_429_S = "5"  # a capped resource is freed when a holder lets go: try again a little later
_CODE_BY_HTTP_STATUS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def status_for(code: str) -> int:
    return STATUS_BY_CODE.get(code, 400)


def error_response(code: str, message: str, details: dict[str, Any] | None = None, *, status: int | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    status = status or status_for(code)
    headers = dict(headers or {})
    if status == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    elif status == 429:
        headers.setdefault("Retry-After", RETRY_AFTER_429_S)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="redrive"'
    body = dumps({"error": {"code": code, "message": message, "details": details or {}}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def from_service_error(exc: ServiceError) -> web.Response:
    # Services already answer ``internal`` without their stack (shared/rpc.py).
    return error_response(exc.code, exc.message, exc.details)


def from_http_exception(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body too large) in our shape."""
    code = _CODE_BY_HTTP_STATUS.get(exc.status, "bad_request" if exc.status < 500 else "internal")
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
    message = {404: "no such route", 405: f"{exc.reason}: allowed {exc.headers.get('Allow', '')}".strip(),
               # aiohttp's text names both sizes; the limit is REDRIVE_MAX_REQUEST_BYTES.
               413: f"{exc.text or exc.reason} (bytes: the largest request this API takes); "
                    "send fewer files per request, or large files by url"}.get(
        exc.status, exc.reason or "request refused")
    return error_response(code, message, status=exc.status, headers=headers)


@web.middleware
async def errors_middleware(request: web.Request, handler) -> web.StreamResponse:
    """The last word on failures: whatever a handler raises becomes our error JSON."""
    response = await _answer(request, handler)
    if request.content.exception() is not None:
        # The body could not be read (bad Content-Encoding…): aiohttp drops the connection
        # after this answer, so tell the client not to send its next request on it.
        response.force_close()
    return response


async def _answer(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like pass through
            raise
        return from_http_exception(exc)
    except ServiceError as exc:
        return from_service_error(exc)
    except Exception as exc:
        if isinstance(exc, TransientError) or is_transient_db_error(exc):
            log.warning("gateway.dependency_unavailable", path=request.path, error=repr(exc))
            return error_response("dependency_unavailable", "a dependency of the gateway is unavailable; try again",
                                  {"dependency": "database"})
        # A bug: its stack goes to the log, never to the client.
        log.exception("gateway.unhandled", method=request.method, path=request.path, error=repr(exc))
        return error_response("internal", "the gateway could not complete the request")
