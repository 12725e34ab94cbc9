"""Every failure leaves the gateway in one JSON shape, with the right status, and never
with a stack trace."""

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.errors import TransientError
from shared.messages import ServiceError
from services.gateway.errors import errors_middleware, status_for


@pytest.mark.parametrize("code, status", [
    ("not_found", 404), ("validation_error", 422), ("insufficient_credits", 402), ("run_running", 409),
    ("run_not_recoverable", 409), ("conflict", 409), ("file_pending", 409), ("idempotency_in_progress", 409),
    ("idempotency_key_reused", 422), ("service_unavailable", 503), ("dependency_unavailable", 503),
    ("forbidden", 403), ("unauthorized", 401), ("internal", 500), ("run_completed", 400),
    ("nothing_to_retry", 400), ("max_retry_count_exceeded", 400), ("step_not_optional", 400),
    ("file_not_failed", 400), ("reservation_voided", 400), ("bad_request", 400), ("payload_too_large", 413),
    ("unknown_verb", 501),
])
def test_service_codes_map_to_http_statuses(code, status):
    assert status_for(code) == status


async def _client() -> TestClient:
    async def refuse(request):
        raise ServiceError(request.match_info["code"], "refused", {"why": "test"})

    async def bug(request):
        raise RuntimeError("secret internals")

    async def db_down(request):
        raise TransientError("database unavailable")

    app = web.Application(middlewares=[errors_middleware])
    app.router.add_get("/refuse/{code}", refuse)
    app.router.add_get("/bug", bug)
    app.router.add_get("/db", db_down)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_errors_keep_one_shape_and_never_carry_a_stack():
    client = await _client()
    try:
        r = await client.get("/refuse/insufficient_credits")
        assert r.status == 402
        assert await r.json() == {"error": {"code": "insufficient_credits", "message": "refused", "details": {"why": "test"}}}
        r = await client.get("/refuse/service_unavailable")
        assert r.status == 503 and r.headers["Retry-After"] == "2"
        r = await client.get("/bug")
        body = await r.text()
        assert r.status == 500 and "secret internals" not in body and "Traceback" not in body
        assert (await r.json())["error"]["code"] == "internal"
        r = await client.get("/db")
        assert r.status == 503 and (await r.json())["error"]["code"] == "dependency_unavailable"
        r = await client.get("/nowhere")
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        r = await client.post("/bug")
        assert r.status == 405 and (await r.json())["error"]["code"] == "method_not_allowed" and r.headers["Allow"]
    finally:
        await client.close()


def test_requests_the_http_parser_refuses_are_one_warning_line_not_a_traceback():
    import logging
    import sys

    from aiohttp.http_exceptions import BadHttpMessage

    from shared.logging import _one_line_for_malformed_requests

    def record_of(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                     ("127.0.0.1",), sys.exc_info())

    refused = record_of(BadHttpMessage("Invalid character in Content-Length:\n\n  b'abc'\n  ^"))
    assert _one_line_for_malformed_requests(refused)
    assert (refused.levelno, refused.exc_info) == (logging.WARNING, None)
    assert refused.getMessage().startswith("Error handling request from 127.0.0.1: BadHttpMessage: 400")
    assert "\n" not in refused.getMessage() and "abc" not in refused.getMessage()
    # The start of an oversized header line is not logged: it is someone's credentials.
    from aiohttp.http_exceptions import LineTooLong

    long_line = record_of(LineTooLong(b"Authorization: Bearer rk_secret" + b"x" * 100, 8190))
    assert _one_line_for_malformed_requests(long_line)
    said = long_line.getMessage()
    assert "LineTooLong" in said and "rk_secret" not in said and "Bearer" not in said, said
    bug = record_of(RuntimeError("ours"))
    assert _one_line_for_malformed_requests(bug)
    assert bug.levelno == logging.ERROR and bug.exc_info is not None  # our own errors keep their traceback


def test_a_malformed_request_line_with_both_kinds_of_quotes_is_logged_without_it():
    import logging
    import sys

    from aiohttp.http_exceptions import LineTooLong

    from shared.logging import _one_line_for_malformed_requests

    try:
        raise LineTooLong(b"Cookie: q=\"1\"; session=it's-SECRET-TOKEN-123" + b"x" * 50, 8190)
    except LineTooLong:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                   ("127.0.0.1",), sys.exc_info())
    assert _one_line_for_malformed_requests(record)
    assert "SECRET" not in record.getMessage() and "LineTooLong" in record.getMessage(), record.getMessage()
