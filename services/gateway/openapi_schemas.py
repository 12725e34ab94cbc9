"""The JSON Schemas of what the API answers (``components.schemas`` of the OpenAPI
document), written once here and ``$ref``'d by openapi.py. Each follows the code that
builds the body: services/coordinator/views.py and store.run_body (runs, templates),
timeline.py, commands/queries.py (pages, attention), services/billing (balance, ledger),
services/notifier/handlers.py (notifications, webhook, deliveries), the executor's
``breakers`` verb, and the gateway's own local routes (app.py).

Objects are open (no ``additionalProperties: false``): a field added later is not a break.
tests/integration/test_openapi_matches_responses.py checks real answers against them,
every field included.
"""

from __future__ import annotations

from typing import Any, get_args

from shared.messages import FileStatus, RetryPolicy

RUN_STATUSES = ["RUNNING", "COMPLETED", "COMPLETED_WITH_ERRORS", "FAILED", "CANCELLED"]
REF = "#/components/schemas/{name}"

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": REF.format(name=name)}


def obj(required: list[str] | None = None, **properties: Schema) -> Schema:
    """An object with ``properties``; every one required unless ``required`` names them."""
    return {"type": "object", "required": list(properties) if required is None else required,
            "properties": properties}


def nullable(schema: Schema) -> Schema:
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    return {**schema, "type": [schema["type"], "null"]}


def page(item: Schema, **more: Schema) -> Schema:
    """``{"items": [...], "next_cursor"}``: pass next_cursor back as ``cursor`` for the next page."""
    return obj(items={"type": "array", "items": item},
               next_cursor=nullable({"type": "string", "description": "null on the last page"}), **more)


STRING, INTEGER, BOOLEAN = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
TIME = {"type": "string", "format": "date-time"}
ANY_OBJECT = {"type": "object", "additionalProperties": True}

ERROR = obj(error=obj(code={**STRING, "description": "machine-readable; see each response's x-redrive-error-codes"},
                      message={**STRING, "description": "a human sentence"},
                      details={**ANY_OBJECT, "description": "422: fields (name → problem); 402: needed, available"}))
CREDITS_ERROR = obj(error=obj(code={"type": "string", "enum": ["insufficient_credits"]}, message=STRING,
                              details=obj(needed=INTEGER, available=INTEGER)))

RUN_PROPERTIES: dict[str, Schema] = {
    "id": STRING, "tenant_id": STRING, "template_id": STRING,
    "status": {"type": "string", "enum": RUN_STATUSES},
    "mode": {"type": "string", "enum": ["per_file", "batch"]},
    "round": INTEGER, "max_retry_count": INTEGER,
    "counts": obj(**{name: INTEGER for name in ("total", "pending", "succeeded", "failed", "errored", "skipped",
                                                "cancelled")}),
    "credits": obj(consumed=INTEGER, from_monthly=INTEGER, from_purchased=INTEGER, refunded=INTEGER),
    "needs_attention": BOOLEAN,
    "recovering": {**BOOLEAN, "description": "in a recovery (its jobs re-published, or coming back from an executor that died), not yet finished"},
    "attention_reason": nullable({"type": "string", "description": "failed, recovery_failed, stuck, breaker_open"}),
    "created_at": TIME, "updated_at": TIME, "finished_at": nullable(TIME),
    "trace_id": {**STRING, "description": "the W3C trace id every message of the run carries"},
}
_RUN_BODY_ONLY = {  # in the answers about one run, not in lists of runs
    "files": {"type": "array", "items": ref("RunFile"), "description": "one page of the run's files"},
    "files_page": ref("FilesPage"),
}

SCHEMAS: dict[str, Schema] = {
    "Error": ERROR,
    "InsufficientCreditsError": CREDITS_ERROR,
    "Run": obj(required=list(RUN_PROPERTIES), **RUN_PROPERTIES, **_RUN_BODY_ONLY),
    "RunFile": obj(
        required=["index", "name", "status", "retry_attempt", "attempts", "checkpoint_step", "last_error", "output",
                  "skippable"],
        index=INTEGER, name=STRING, status={"type": "string", "enum": list(get_args(FileStatus))},
        retry_attempt={**INTEGER, "description": "user retries (rounds) of this file"},
        attempts={**INTEGER, "description": "deliveries in the current round"},
        checkpoint_step=nullable(INTEGER),
        last_error=nullable({"type": "object", "properties": {"class": STRING, "message": STRING,
                                                               "transient": BOOLEAN}}),
        output={"description": "the last step's output (any JSON), null until it succeeds"},
        skippable={**BOOLEAN, "description": "FAILED or ERROR at an optional step: Skip accepts it"},
        output_omitted={**STRING, "description": "only when the output was too large for a reply"},
    ),
    "FilesPage": obj(required=["offset", "limit", "next_offset"], offset=INTEGER, limit=INTEGER,
                     next_offset=nullable({"type": "integer", "description": "pass as file_offset; null: no more"}),
                     status={"type": "array", "items": STRING}),
    "RunPage": page(ref("Run")),
    "AttentionPage": page(ref("AttentionRun"), total=INTEGER,
                          by_tenant={"type": "object", "additionalProperties": INTEGER}),
    "AttentionRun": obj(**RUN_PROPERTIES, reason={"type": "string", "description": "failed, recovery_failed, stuck, "
                                                                                   "breaker_open"}),
    "TimelinePage": page(ref("TimelineEntry")),
    "TimelineEntry": obj(required=["at", "kind", "actor", "details"], at=TIME, kind=STRING, actor=STRING,
                         file_index=INTEGER, details=ANY_OBJECT),
    "Template": obj(id=STRING, tenant_id=STRING, name=STRING, steps={"type": "array", "items": ref("TemplateStep")},
                    credits_per_file=INTEGER, failure_policy={"type": "string", "enum": ["continue", "fail_fast"]},
                    created_at=TIME, archived=BOOLEAN),
    "TemplateStep": obj(required=["name", "handler"], name=STRING, handler=STRING, optional=BOOLEAN,
                        timeout_s={"type": "number"}, params=ANY_OBJECT, auto_retries=nullable(INTEGER)),
    "TemplatePage": page(ref("Template")),
    "RetrySettings": obj(**{name: {k: v for k, v in prop.items() if k != "title"}
                            for name, prop in RetryPolicy.model_json_schema()["properties"].items()}),
    "Balance": obj(monthly=obj(allowance=INTEGER, remaining=INTEGER, period_end=TIME),
                   purchased=obj(remaining=INTEGER)),
    "LedgerPage": page(ref("LedgerEntry")),
    "LedgerEntry": obj(at=TIME, amount={**INTEGER, "description": "negative for a charge"},
                       kind={"type": "string", "enum": ["charge", "refund", "grant", "reset", "void"]},
                       run_id=nullable(STRING), idempotency_key=STRING, monthly_part=INTEGER, purchased_part=INTEGER,
                       actor=nullable(STRING)),
    "NotificationPage": page(ref("Notification")),
    "Notification": obj(id=STRING, at=TIME, kind=STRING, run_id=nullable(STRING), file_index=nullable(INTEGER),
                        message=STRING, read=BOOLEAN),
    "Webhook": obj(url=STRING, updated_at=TIME),
    "WebhookDeleted": obj(deleted={**BOOLEAN, "description": "false: there was none"}),
    "DeliveryPage": page(ref("Delivery")),
    "Delivery": obj(id={**STRING, "format": "uuid",
                        "description": "opaque; the X-Redrive-Delivery header of its posts, the same when sent again"},
                    notification_id=STRING, kind=STRING, run_id=nullable(STRING), at=nullable(TIME),
                    status={"type": "string", "enum": ["pending", "delivered", "failed"]}, attempts=INTEGER,
                    url={**STRING, "description": "the receiver's origin only"}, last_error=nullable(STRING),
                    delivered_at=nullable(TIME), next_attempt_at=nullable(TIME)),
    "Redelivered": obj(queued=INTEGER),
    "BreakerList": {"type": "array", "items": ref("Breaker")},
    "Breaker": obj(tenant_id=STRING, dependency=STRING,
                   state={"type": "string", "enum": ["closed", "open", "half_open"]}, failures=INTEGER,
                   opened_at=nullable(TIME), next_probe_at=nullable(TIME),
                   not_listed={**INTEGER, "description": "how many more breakers were left out of the list"}),
    "Me": obj(tenant_id=STRING, key_tenant_id=STRING,
              role={"type": "string", "enum": ["platform_admin", "tenant_admin", "member"]},
              user=STRING, key_id=STRING),
    "Health": obj(status={"type": "string", "enum": ["ok"]}),
    "Ready": obj(ready=BOOLEAN, checks=obj(nats=BOOLEAN, database=BOOLEAN)),
}
