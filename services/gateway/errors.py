"""Every error leaves the gateway as {"error": {code, message, details}} with a status
chosen here from the owning service's code; never a stack trace."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shared.messages import ServiceError, dumps

STATUS_BY_CODE = {
    "not_found": 404, "validation_error": 422, "idempotency_key_reused": 422, "insufficient_credits": 402,
    "run_running": 409, "run_not_recoverable": 409, "conflict": 409, "file_pending": 409,
    "idempotency_in_progress": 409, "service_unavailable": 503, "dependency_unavailable": 503,
    "unauthorized": 401, "forbidden": 403, "internal": 500, "response_too_large": 500, "method_not_allowed": 405,
}


def error_response(code: str, message: str, details: dict[str, Any] | None = None, status: int | None = None) -> web.Response:
    status = status or STATUS_BY_CODE.get(code, 400)
    headers = {"Retry-After": "2"} if status == 503 else None
    body = dumps({"error": {"code": code, "message": message, "details": details or {}}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def from_service_error(exc: ServiceError) -> web.Response:
    return error_response(exc.code, exc.message, exc.details)
