"""The route table: one row per HTTP route, naming the verb it forwards to. The router and
the OpenAPI document are both built from it, so the document cannot drift."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from services.gateway import schemas
from shared import requests


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    service: str
    verb: str
    role: str = "member"
    body: type[BaseModel] | None = None
    status: int = 200
    idempotent: bool = False  # honours Idempotency-Key
    query: tuple[str, ...] = ()
    summary: str = ""
    all_tenants_for_admin: bool = False


ROUTES: list[Route] = [
    Route("POST", "/templates", "coordinator", "create_template", "tenant_admin", requests.TemplateBody, 201, True, summary="Create a template"),
    Route("GET", "/templates", "coordinator", "list_templates", summary="List templates"),
    Route("GET", "/templates/{template_id}", "coordinator", "get_template", summary="Get a template"),
    Route("DELETE", "/templates/{template_id}", "coordinator", "archive_template", "tenant_admin", status=204, summary="Archive a template"),
    Route("POST", "/workflow-runs", "coordinator", "create_run", "member", requests.RunBody, 201, True, summary="Start a run"),
    Route("GET", "/workflow-runs", "coordinator", "list_runs", query=("status", "needs_attention", "limit", "cursor"), summary="List runs"),
    Route("GET", "/workflow-runs/{run_id}", "coordinator", "get_run", query=("file_offset", "file_limit"),
          summary="A run with a page of its files (files_page.next_offset for the next)"),
    Route("GET", "/workflow-runs/{run_id}/timeline", "coordinator", "timeline", summary="A run's execution log"),
    Route("POST", "/workflow-runs/{run_id}/retry-failed", "coordinator", "retry_failed", "tenant_admin", idempotent=True, summary="Continue: retry failed files"),
    Route("POST", "/workflow-runs/{run_id}/recover", "coordinator", "recover", "tenant_admin", status=202, summary="Recover from checkpoints"),
    Route("POST", "/workflows/{run_id}/recover", "coordinator", "recover", "tenant_admin", status=202, summary="Recover (alias)"),
    Route("POST", "/workflow-runs/{run_id}/files/{file_index}/retry", "coordinator", "retry_file", "tenant_admin", idempotent=True, summary="Retry one failed file"),
    Route("POST", "/workflow-runs/{run_id}/files/{file_index}/skip", "coordinator", "skip_file", "tenant_admin", summary="Skip a file's optional step"),
    Route("POST", "/workflow-runs/{run_id}/cancel", "coordinator", "cancel", "tenant_admin", summary="Cancel a run"),
    Route("GET", "/settings/retry", "coordinator", "get_settings", summary="Retry settings"),
    Route("PUT", "/settings/retry", "coordinator", "put_settings", "tenant_admin", requests.SettingsBody, summary="Change retry settings"),
    Route("GET", "/credits", "billing", "balance", summary="Credit balance"),
    Route("GET", "/credits/ledger", "billing", "ledger", query=("limit", "cursor"), summary="Credit ledger"),
    Route("POST", "/admin/tenants/{tenant_id}/credits", "billing", "grant", "platform_admin", schemas.GrantBody, idempotent=True, summary="Grant purchased credits"),
    Route("GET", "/notifications", "notifier", "list", query=("unread", "limit", "cursor"), summary="Notifications"),
    Route("POST", "/notifications/{id}/read", "notifier", "mark_read", summary="Mark a notification read"),
    Route("PUT", "/webhook", "notifier", "put_webhook", "tenant_admin", schemas.WebhookBody, summary="Set the webhook"),
    Route("GET", "/webhook", "notifier", "get_webhook", summary="The webhook"),
    Route("GET", "/admin/attention", "coordinator", "attention", "tenant_admin", all_tenants_for_admin=True, summary="Runs needing attention"),
    Route("GET", "/admin/breakers", "executor", "breakers", summary="Circuit breakers"),
    Route("POST", "/admin/workflow-runs/{run_id}/restore", "coordinator", "restore", "platform_admin", requests.RestoreBody, summary="Restore from a checkpoint"),
]


def query_payload(route: Route, query) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in route.query:
        if name in query:
            value = query[name]
            if name in ("needs_attention", "unread"):
                out["unread_only" if name == "unread" else name] = value.lower() in ("1", "true", "yes")
            else:
                out[name] = value
    return out
