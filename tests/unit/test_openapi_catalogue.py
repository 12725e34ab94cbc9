"""The OpenAPI document says, per route, what it answers: its success body and every error
status it can return, with the codes behind each. (Real answers are checked against it in
tests/integration/test_openapi_matches_responses.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from services.gateway import openapi
from services.gateway.openapi import openapi_document
from services.gateway.routes import API, ROUTES

ROOT = Path(__file__).resolve().parents[2]
# Where the services raise the refusals the gateway passes on.
RAISERS = ["services/coordinator/commands", "services/coordinator/store.py", "services/coordinator/credits.py",
           "services/coordinator/cursor.py", "services/billing/handlers.py", "services/billing/accounts.py",
           "services/notifier/handlers.py", "services/gateway"]


def _op(method: str, path: str) -> dict:
    return openapi_document()["paths"][API + path][method.lower()]


def _codes(method: str, path: str, status: int) -> list[str]:
    return _op(method, path)["responses"][str(status)]["x-redrive-error-codes"]


def test_every_route_has_a_success_schema_and_the_catalogue_names_only_real_verbs():
    verbs = {f"{r.service}.{r.verb}" for r in ROUTES}
    assert verbs <= set(openapi.SUCCESS), verbs - set(openapi.SUCCESS)
    assert set(openapi.SUCCESS) | set(openapi.ROUTE_ERRORS) <= verbs
    schemas = openapi_document()["components"]["schemas"]
    for route in ROUTES:
        success = _op(route.method, route.path)["responses"][str(route.status)]
        if route.status == 204:
            assert "content" not in success
            continue
        schema = success["content"]["application/json"]["schema"]
        ref = schema.get("$ref") or schema["anyOf"][0]["$ref"]
        assert schemas[ref.rsplit("/", 1)[1]].get("type") in ("object", "array"), route


def test_the_error_schema_is_the_contracts():
    error = openapi_document()["components"]["schemas"]["Error"]
    assert error["required"] == ["error"]
    inner = error["properties"]["error"]
    assert inner["required"] == ["code", "message", "details"]
    assert [inner["properties"][k]["type"] for k in ("code", "message", "details")] == ["string", "string", "object"]


def test_the_refusals_of_the_contract_are_listed_where_they_are_answered():
    retry = "/workflow-runs/{run_id}/retry-failed"
    assert {"run_completed", "nothing_to_retry", "max_retry_count_exceeded"} <= set(_codes("POST", retry, 400))
    assert _codes("POST", retry, 402) == ["insufficient_credits"]
    assert {"run_running", "conflict", "idempotency_in_progress"} <= set(_codes("POST", retry, 409))
    assert "not_found" in _codes("POST", retry, 404)
    assert "idempotency_key_reused" in _codes("POST", retry, 422)
    credits_error = _op("POST", retry)["responses"]["402"]["content"]["application/json"]["schema"]["$ref"]
    details = openapi_document()["components"]["schemas"][credits_error.rsplit("/", 1)[1]]
    assert details["properties"]["error"]["properties"]["details"]["required"] == ["needed", "available"]
    assert "not_found" in _codes("GET", "/templates/{template_id}", 404)
    assert {"insufficient_credits"} == set(_codes("POST", "/workflow-runs", 402))
    assert "not_found" in _codes("POST", "/workflow-runs", 404)
    assert "too_many_requests" in _codes("POST", "/workflow-runs", 429)
    for recover in ("/workflow-runs/{run_id}/recover", "/workflows/{run_id}/recover"):
        assert "run_not_recoverable" in _codes("POST", recover, 409)
    file_retry, skip = "/workflow-runs/{run_id}/files/{file_index}/retry", "/workflow-runs/{run_id}/files/{file_index}/skip"
    assert {"file_not_failed", "max_retry_count_exceeded"} <= set(_codes("POST", file_retry, 400))
    assert {"file_pending", "run_running"} <= set(_codes("POST", file_retry, 409))
    assert "insufficient_credits" in _codes("POST", file_retry, 402)
    assert {"step_not_optional"} == set(_codes("POST", skip, 400))  # api.md's one refusal of a skip
    assert "conflict" in _codes("POST", "/workflow-runs/{run_id}/cancel", 409)


def test_what_the_gateway_itself_answers_is_listed_on_each_route():
    for route in ROUTES:
        responses = _op(route.method, route.path)["responses"]
        assert {"401", "403", "404", "422", "503", "default"} <= set(responses), route
        assert responses["503"]["headers"]["Retry-After"]
        if route.idempotent:
            assert "idempotency_in_progress" in responses["409"]["x-redrive-error-codes"], route
            assert "idempotency_key_reused" in responses["422"]["x-redrive-error-codes"], route
        if route.body is not None:
            assert {"400", "408", "413"} <= set(responses), route
    events = openapi_document()["paths"][API + "/events"]["get"]["responses"]
    assert "too_many_requests" in events["429"]["x-redrive-error-codes"]


def test_every_code_a_service_refuses_with_is_documented():
    raised = set()
    for where in RAISERS:
        path = ROOT / where
        for source in ([path] if path.is_file() else sorted(path.rglob("*.py"))):
            raised |= set(re.findall(r'ServiceError\(\s*"(\w+)"', source.read_text()))
    documented = {code for ops in openapi_document()["paths"].values() for op in ops.values()
                  for response in op["responses"].values() for code in response.get("x-redrive-error-codes", [])}
    # Answered under default (500/501), or not by a route the document lists (billing's
    # reserve answers the coordinator alone, which turns reservation_voided into a 503).
    assert raised - documented <= {"internal", "unknown_verb", "method_not_allowed", "reservation_voided"}, \
        raised - documented
