"""Files of a run sent ahead in parts: a run body larger than one bus message (the
gateway splits it, services/gateway/staging.py) arrives as ``stage_files`` parts, then as
a ``create_run`` naming them (``staged``). The run's transaction takes them (create_run.py).
An upload no run will take is deleted at once: its run refused, or one of its parts (the
gateway then gives up on it). Only parts a gateway left behind when it died or lost the
coordinator mid-upload wait for the recovery sweeper, which prunes them after a day.

Every tenant's parts share the database's disk, so what a tenant holds staged is capped
(REDRIVE_MAX_STAGED_BYTES_PER_TENANT): a part past the cap is a 429 while the tenant's other
uploads hold the room (it is freed as they become runs or are refused), a 413 when its own
upload alone is larger than the cap (no retry would take it)."""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import delete_in_batches, transaction
from shared.messages import ServiceError
from shared.requests import FileIn
from services.coordinator.context import Deps
from services.coordinator.schemas import StagedRef, StageFiles

log = structlog.get_logger(__name__)

RETENTION_S = 24 * 3600.0
# What a staged row costs the database besides its fields (tuple header, upload id, index,
# tenant, time, its primary key's index entry), counted against the cap so that uploads of
# many tiny files cannot fill the disk while their fields alone stay under it.
ROW_OVERHEAD_BYTES = 160
_FIELD_BYTES = ("octet_length(name) + coalesce(octet_length(url), 0) + coalesce(octet_length(content_b64), 0)"
                " + coalesce(octet_length(sha256), 0)")

_STAGE = text(
    "INSERT INTO coordinator.staged_files (upload_id, idx, tenant_id, name, url, content_b64, size, sha256)"
    " SELECT :upload_id, :offset + o - 1, :tenant_id, f.name, f.url, f.content_b64, f.size, f.sha256"
    " FROM unnest(CAST(:names AS text[]), CAST(:urls AS text[]), CAST(:contents AS text[]), CAST(:sizes AS bigint[]),"
    "             CAST(:sha256s AS text[])) WITH ORDINALITY AS f(name, url, content_b64, size, sha256, o)"
    # A part sent again (the gateway's request timed out after it was stored) changes nothing.
    " ON CONFLICT (upload_id, idx) DO NOTHING"
)
_TAKE = text(
    "SELECT idx, name, url, content_b64, size, sha256 FROM coordinator.staged_files"
    " WHERE upload_id = :upload_id AND tenant_id = :tenant_id ORDER BY idx"
)
_SURVEY = text(
    "SELECT count(*) AS n, max(idx) AS last FROM coordinator.staged_files WHERE upload_id = :upload_id AND tenant_id = :tenant_id"
)
# The file whose job is the largest (job_messages: name, url and inline content travel in it).
_BIGGEST = text(
    "SELECT idx, name, url, content_b64, size, sha256 FROM coordinator.staged_files"
    " WHERE upload_id = :upload_id AND tenant_id = :tenant_id"
    " ORDER BY octet_length(name) + coalesce(octet_length(url), 0) + coalesce(octet_length(content_b64), 0) DESC LIMIT 1"
)
# Moved in one statement: a 100,000-file run's rows never travel to Python and back.
_MOVE = text(
    "WITH taken AS (DELETE FROM coordinator.staged_files WHERE upload_id = :upload_id AND tenant_id = :tenant_id"
    "  RETURNING idx, name, url, content_b64, size, sha256)"
    " INSERT INTO coordinator.files (run_id, idx, name, url, content_b64, size, sha256, status, charge_key)"
    " SELECT :run_id, idx, name, url, content_b64, size, sha256, 'PENDING', :charge_key FROM taken"
)
_FORGET = text("DELETE FROM coordinator.staged_files WHERE upload_id = :upload_id AND tenant_id = :tenant_id")
# A tenant's parts are staged one at a time, so that two at once cannot both pass the cap.
_LOCK_TENANT = text("SELECT pg_advisory_xact_lock(hashtextextended('coordinator.staged:' || :tenant_id, 0))")
# octet_length reads a TOASTed value's size from its pointer: the contents are not fetched.
_HELD = text(
    f"SELECT coalesce(sum({_FIELD_BYTES} + :overhead), 0) AS tenant,"
    f" coalesce(sum({_FIELD_BYTES} + :overhead) FILTER (WHERE upload_id = :upload_id), 0) AS upload"
    " FROM coordinator.staged_files WHERE tenant_id = :tenant_id"
)
_PRUNE = text(
    "DELETE FROM coordinator.staged_files WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM coordinator.staged_files WHERE staged_at < now() - make_interval(secs => :age) LIMIT :batch))"
)


async def stage_files(deps: Deps, cmd: StageFiles) -> dict:
    """Store a part. Refused, the upload's earlier parts are deleted too: the gateway gives up
    on an upload at its first refused part, and answers the request with the refusal."""
    try:
        await _stage(deps, cmd)
    except BaseException:
        await discard(deps.engine, cmd.tenant_id, cmd.upload_id)
        raise
    return {"upload_id": cmd.upload_id, "staged": len(cmd.files)}


async def _stage(deps: Deps, cmd: StageFiles) -> None:
    if cmd.offset + len(cmd.files) > deps.settings.max_files_per_run:
        raise ServiceError("validation_error", f"a run takes at most {deps.settings.max_files_per_run} files",
                           {"fields": {"files": f"at most {deps.settings.max_files_per_run} files"}})
    incoming = sum(staged_bytes(f) for f in cmd.files)
    async with transaction(deps.engine) as conn:
        await conn.execute(_LOCK_TENANT, {"tenant_id": cmd.tenant_id})
        held = (await conn.execute(_HELD, {"tenant_id": cmd.tenant_id, "upload_id": cmd.upload_id,
                                           "overhead": ROW_OVERHEAD_BYTES})).one()
        _refuse_past_cap(deps.settings.max_staged_bytes_per_tenant, held.tenant, held.upload, incoming)
        await conn.execute(_STAGE, {
            "upload_id": cmd.upload_id, "offset": cmd.offset, "tenant_id": cmd.tenant_id,
            "names": [f.name for f in cmd.files], "urls": [f.url for f in cmd.files],
            "contents": [f.content_b64 for f in cmd.files], "sizes": [f.size for f in cmd.files],
            "sha256s": [f.sha256 for f in cmd.files],
        })


def staged_bytes(f: FileIn) -> int:
    """What a staged file counts against the cap (as _HELD counts it in the database)."""
    fields = (f.name, f.url, f.content_b64, f.sha256)
    return ROW_OVERHEAD_BYTES + sum(len(v.encode()) for v in fields if v is not None)


def _refuse_past_cap(cap: int, tenant: int, upload: int, incoming: int) -> None:
    if tenant + incoming <= cap:
        return
    details = {"limit": cap, "per": "tenant", "staged_bytes": tenant, "part_bytes": incoming}
    if upload + incoming > cap:
        raise ServiceError("payload_too_large", f"the request's files take more than the {cap:,} bytes a tenant may "
                           "send ahead at once (REDRIVE_MAX_STAGED_BYTES_PER_TENANT); send fewer files per run, "
                           "or large files by url", details)
    raise ServiceError("too_many_requests", f"this tenant's other requests in progress hold {tenant - upload:,} of the "
                       f"{cap:,} bytes a tenant may send ahead at once (REDRIVE_MAX_STAGED_BYTES_PER_TENANT); "
                       "send it again when they are done", details)


async def take(conn: AsyncConnection, tenant_id: str, staged: StagedRef) -> list[FileIn]:
    """The staged files, in order; refused unless every part arrived (indexes 0…count-1)."""
    rows = (await conn.execute(_TAKE, {"upload_id": staged.upload_id, "tenant_id": tenant_id})).all()
    _complete(len(rows), rows[-1].idx if rows else None, staged)
    return [_file(r) for r in rows]


async def biggest(conn: AsyncConnection, tenant_id: str, staged: StagedRef) -> tuple[int, FileIn]:
    """The staged file with the largest job and its index, once every part is known to have arrived."""
    params = {"upload_id": staged.upload_id, "tenant_id": tenant_id}
    survey = (await conn.execute(_SURVEY, params)).one()
    _complete(survey.n, survey.last, staged)
    row = (await conn.execute(_BIGGEST, params)).one()
    return row.idx, _file(row)


async def move(conn: AsyncConnection, tenant_id: str, staged: StagedRef, run_id: str, charge_key: str | None) -> None:
    """Make the staged files the run's (in the run's transaction) and forget them here;
    refused (the transaction rolls back) unless every one of them is still there."""
    moved = await conn.execute(_MOVE, {"upload_id": staged.upload_id, "tenant_id": tenant_id, "run_id": run_id,
                                       "charge_key": charge_key})
    if moved.rowcount != staged.count:  # deleted since they were counted (discard, prune)
        _incomplete(moved.rowcount, staged)


def _complete(n: int, last: int | None, staged: StagedRef) -> None:
    if n != staged.count or last != staged.count - 1:
        _incomplete(n, staged)


def _incomplete(n: int, staged: StagedRef) -> None:
    raise ServiceError("bad_request", f"{n} of the run's {staged.count} files were sent ahead; "
                       "send the request again")


def _file(row) -> FileIn:
    # Validated as FileIn when they were staged.
    return FileIn.model_construct(name=row.name, url=row.url, content_b64=row.content_b64, size=row.size,
                                  sha256=row.sha256)


async def forget(conn: AsyncConnection, tenant_id: str, staged: StagedRef) -> None:
    await conn.execute(_FORGET, {"upload_id": staged.upload_id, "tenant_id": tenant_id})


async def discard(engine: AsyncEngine, tenant_id: str, upload_id: str) -> None:
    """Delete an upload no run will take, now rather than after a day. Only the tenant's own
    (another tenant naming it deletes nothing). Done even while the request is being
    cancelled; never raises (a database gone meanwhile: the sweeper prunes it later), so the
    refusal that made it moot is what the caller hears."""
    async def delete() -> None:
        async with transaction(engine) as conn:
            await conn.execute(_FORGET, {"upload_id": upload_id, "tenant_id": tenant_id})

    try:
        await asyncio.shield(delete())
    except Exception as exc:
        log.warning("staged_files.discard_failed", tenant_id=tenant_id, upload_id=upload_id, error=repr(exc)[:300])


async def prune(engine: AsyncEngine, *, older_than_s: float = RETENTION_S, batch: int = 10_000,
                max_batches: int = 10) -> tuple[int, bool]:
    """Forget parts of runs that were never created: (how many rows, whether some are left)."""
    return await delete_in_batches(engine, _PRUNE, {"age": float(older_than_s)}, batch=batch, max_batches=max_batches)
