"""Templates: create, read, archive (soft delete: runs that use one keep working)."""

from __future__ import annotations

import uuid

import orjson
import structlog
from sqlalchemy import text

from shared.db import transaction
from shared.messages import ServiceError
from services.coordinator import cursor, file_needs, pages, store
from services.coordinator.context import Deps
from services.coordinator.schemas import CreateTemplate, ListTemplates, TemplateRef
from services.coordinator.views import template_view

log = structlog.get_logger(__name__)


def refuse_unoffered(deps: Deps, handlers: list[str]) -> None:
    """A 422 naming each step whose handler no executor offers (shared/handler_offers.py):
    refused before anything is made or charged, rather than every file ending ERROR."""
    unknown = deps.handlers.unknown(handlers) if deps.handlers is not None else {}
    if unknown:
        raise ServiceError("validation_error", "a step names a handler that no executor offers",
                           {"fields": {f"steps.{i}.handler": why for i, why in unknown.items()}})


async def refuse_bad_params(deps: Deps, steps: list[dict]) -> dict[str, list[str]]:
    """A 422 naming each step whose params its handler refuses, asked of an executor (the
    handlers' own checks). Else what the steps need of every file (file_needs.py), as the
    executor answered. No executor answering, the template is made unchecked and needs
    nothing: its runs' files would end ERROR with the same reasons."""
    if deps.executors is None:
        return {}
    try:
        answer = await deps.executors.call("executor", "check_steps", {"steps": steps})
    except ServiceError as exc:
        log.info("templates.params_unchecked", reason=exc.code)
        return {}
    answer = answer if isinstance(answer, dict) else {}
    if answer.get("problems"):
        raise ServiceError("validation_error", "a step's params are refused by its handler", {"fields": answer["problems"]})
    return file_needs.readable(answer.get("file_needs"), len(steps))


async def create_template(deps: Deps, cmd: CreateTemplate) -> dict:
    refuse_unoffered(deps, [s.handler for s in cmd.steps])
    needs = await refuse_bad_params(deps, [{"handler": s.handler, "params": s.params} for s in cmd.steps])
    async with transaction(deps.engine) as conn:
        row = (await conn.execute(text(
            "INSERT INTO coordinator.templates (id, tenant_id, name, steps, credits_per_file, failure_policy, file_needs) "
            "VALUES (:id, :tenant_id, :name, CAST(:steps AS jsonb), :cpf, :policy, CAST(:needs AS jsonb)) RETURNING *"),
            {"id": uuid.uuid4().hex, "tenant_id": cmd.tenant_id, "name": cmd.name,
             "steps": orjson.dumps([s.model_dump() for s in cmd.steps]).decode(), "cpf": cmd.credits_per_file,
             "policy": cmd.failure_policy, "needs": orjson.dumps(needs).decode()})).mappings().one()
    return template_view(row)


async def get_template(deps: Deps, cmd: TemplateRef) -> dict:
    async with deps.engine.connect() as conn:
        return template_view(await store.load_template(conn, cmd.tenant_id, cmd.template_id, include_archived=True))


async def list_templates(deps: Deps, cmd: ListTemplates) -> dict:
    """The tenant's templates, newest first, a page at a time (``next_cursor``)."""
    where, params = "tenant_id = :t AND archived_at IS NULL", {"t": cmd.tenant_id, "limit": cmd.limit + 1}
    if cmd.cursor:
        params["c_at"], params["c_id"] = cursor.decode(cmd.cursor)
        where += " AND (created_at, id) < (:c_at, :c_id)"
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(text(
            f"SELECT * FROM coordinator.templates WHERE {where} ORDER BY created_at DESC, id DESC LIMIT :limit"),
            params)).mappings().all()
    items, cut = pages.within_page(template_view(r) for r in rows[: cmd.limit])
    more = cut or len(rows) > cmd.limit
    last = rows[len(items) - 1] if items else None
    return {"items": items, "next_cursor": cursor.encode(last["created_at"], last["id"]) if more else None}


async def archive_template(deps: Deps, cmd: TemplateRef) -> dict:
    async with transaction(deps.engine) as conn:
        await store.load_template(conn, cmd.tenant_id, cmd.template_id, include_archived=False)
        await conn.execute(text("UPDATE coordinator.templates SET archived_at = now() WHERE id = :id AND tenant_id = :t"),
                           {"id": cmd.template_id, "t": cmd.tenant_id})
    return {"archived": True}
