"""Initiate a run: reserve N × credits_per_file all-or-nothing, then write the run, its
files, the outbox row that stands for its jobs and the timeline in one transaction. The
files come inline, or sent ahead in parts when the body is larger than a bus message
(staged_files.py): the same transaction then takes them from where they wait, and none
is left behind whatever the answer (see create_run)."""

from __future__ import annotations

import uuid

from sqlalchemy import text

from shared import tracing
from shared.bus import fits
from shared.copy import COPY_THRESHOLD, copy_rows
from shared.db import transaction
from shared.rpc import ensure_caller_waits
from shared.messages import ServiceError
from services.coordinator import credits, file_needs, jobs, outbox, store, timeline
from services.coordinator.commands import staged_files
from services.coordinator.commands.templates import refuse_unoffered
from services.coordinator.context import Deps
from services.coordinator.run_events import run_event_row
from services.coordinator.schemas import CreateRun
from services.coordinator.undeliverable import too_large_message

_INSERT_RUN = text(
    "INSERT INTO coordinator.runs (id, tenant_id, template_id, status, mode, failure_policy, credits_per_file,"
    " max_retry_count, total, pending, credits_consumed, credits_from_monthly, credits_from_purchased, created_by,"
    " trace_id)"
    " VALUES (:id, :tenant_id, :template_id, 'RUNNING', :mode, :failure_policy, :credits_per_file,"
    " :max_retry_count, :total, :total, :consumed, :from_monthly, :from_purchased, :actor, :trace_id)"
    " RETURNING *"
)
_FILE_COLUMNS = ("run_id", "idx", "name", "url", "content_b64", "size", "sha256", "status", "charge_key")
_OPTIONAL = frozenset({"url", "content_b64", "size", "sha256", "charge_key"})
_INSERT_FILE = text(
    "INSERT INTO coordinator.files (run_id, idx, name, url, content_b64, size, sha256, status, charge_key)"
    " VALUES (:run_id, :idx, :name, :url, :content_b64, :size, :sha256, 'PENDING', :charge_key)"
)


async def create_run(deps: Deps, cmd: CreateRun) -> dict:
    """The run, made or (its run id taken by the same tenant: the request again) found.

    The upload it names (``staged``) is this request's alone, so once answered it is gone,
    whatever the answer: a run made took it in its transaction; a refusal (unknown template,
    credits, 422, a failure) deletes it now, so that a refused request holds nothing of the
    shared disk. That never touches a retry's files: the gateway names each attempt's upload
    anew (services/gateway/staging.py); only the run id carries over from the
    Idempotency-Key. A run found already made does not need the upload either."""
    try:
        return await _create_run(deps, cmd)
    finally:
        if cmd.staged is not None:
            await staged_files.discard(deps.engine, cmd.tenant_id, cmd.staged.upload_id)


async def _create_run(deps: Deps, cmd: CreateRun) -> dict:
    if bool(cmd.files) == (cmd.staged is not None):
        field, problem = ("staged", "not with files") if cmd.files else ("files", "at least one file")
        raise ServiceError("validation_error", "a run names its files inline (files) or sent ahead (staged)",
                           {"fields": {field: problem}})
    count = cmd.staged.count if cmd.staged else len(cmd.files)
    if count > deps.settings.max_files_per_run:
        raise ServiceError(
            "validation_error", f"a run takes at most {deps.settings.max_files_per_run} files",
            {"fields": {"files": f"at most {deps.settings.max_files_per_run} files"}},
        )
    run_id = cmd.run_id or uuid.uuid4().hex
    # The request's trace goes on through the run (shared/tracing.py).
    trace_id = tracing.current.get()
    async with deps.engine.connect() as conn:
        if cmd.run_id:  # the gateway derives it from an Idempotency-Key: a repeat finds its run
            existing = (await conn.execute(text("SELECT * FROM coordinator.runs WHERE id = :id"),
                                           {"id": run_id})).mappings().first()
            if existing is not None and existing["tenant_id"] != cmd.tenant_id:
                # Refused before any charge: the insert would fail after it, and the refund
                # would be looked up under the other run's (already settled) charge key.
                raise ServiceError("conflict", "this run id is taken; choose another")
            if existing is not None:
                return await store.run_body(conn, dict(existing))
        template = await store.load_template(conn, cmd.tenant_id, cmd.template_id, include_archived=False)
        policy = await store.retry_policy(conn, cmd.tenant_id)
        # Staged files of a per_file run stay in the database: they move in the transaction,
        # and only the biggest comes here, to check that its job fits a message.
        moved = cmd.staged is not None and cmd.mode == "per_file"
        if moved:
            await file_needs.refuse_lacking_staged(conn, cmd.tenant_id, cmd.staged.upload_id, template)
            incoming = [await staged_files.biggest(conn, cmd.tenant_id, cmd.staged)]
        else:
            incoming = list(enumerate(await staged_files.take(conn, cmd.tenant_id, cmd.staged) if cmd.staged
                                      else cmd.files))
            file_needs.refuse_lacking(template, incoming)
    # A template made before any executor offered its handlers, or whose handler is gone.
    refuse_unoffered(deps, [s["handler"] for s in template["steps"]])
    # A run id from an Idempotency-Key may have been tried before and its charge settled for
    # good (refunded or voided: the attempt's outcome was unknown, a 503): its retry, under
    # the same key, charges under a key of its own, as a Continue's does.
    key = (await credits.fresh_key(deps.credits_db, credits.initiate_key(run_id)) if cmd.run_id
           else credits.initiate_key(run_id))
    charge_key = key if template["credits_per_file"] else None
    files = [
        {"run_id": run_id, "idx": i, "name": f.name, "url": f.url, "content_b64": f.content_b64,
         "size": f.size, "sha256": f.sha256, "charge_key": charge_key}
        for i, f in incoming
    ]
    job_rows = _first_jobs(deps, cmd, run_id, template, files, policy, trace_id)  # before any charge: may refuse
    amount = count * template["credits_per_file"]
    charge = await credits.reserve(deps.credits_db, deps.billing, key=key, run_id=run_id, tenant_id=cmd.tenant_id, amount=amount, actor=cmd.actor
    )
    try:
        async with transaction(deps.engine) as conn:
            run = (
                await conn.execute(
                    _INSERT_RUN,
                    {
                        "id": run_id, "tenant_id": cmd.tenant_id, "template_id": template["id"], "mode": cmd.mode,
                        "failure_policy": template["failure_policy"], "credits_per_file": template["credits_per_file"],
                        "max_retry_count": cmd.max_retry_count, "total": count, "consumed": charge.charged,
                        "from_monthly": charge.from_monthly, "from_purchased": charge.from_purchased, "actor": cmd.actor,
                        "trace_id": trace_id,
                    },
                )
            ).mappings().one()
            if moved:
                await staged_files.move(conn, cmd.tenant_id, cmd.staged, run_id, charge_key)
            elif len(files) >= COPY_THRESHOLD:
                # Only the columns some file has a value for: most runs name files and nothing
                # else, and each column left out is 10,000 values fewer to encode and write.
                columns = [c for c in _FILE_COLUMNS if c not in _OPTIONAL or any(f[c] is not None for f in files)]
                await copy_rows(conn, "coordinator", "files", columns,
                                (tuple("PENDING" if c == "status" else f[c] for c in columns) for f in files))
            else:
                await conn.execute(_INSERT_FILE, files)
            await outbox.add(conn, job_rows + [run_event_row(deps.names, run, "started")])
            await timeline.append(conn, timeline.entry(run_id, cmd.tenant_id, "run_created", cmd.actor, files=count,
                                                       mode=cmd.mode, template_id=template["id"]))
            await credits.apply(conn, charge, run_id=run_id, tenant_id=cmd.tenant_id, actor=cmd.actor)
            if cmd.staged and not moved:
                await staged_files.forget(conn, cmd.tenant_id, cmd.staged)
            ensure_caller_waits()  # else: rolled back, refunded below
    except BaseException:
        await credits.compensate(deps.credits_db, deps.billing, key=key, tenant_id=cmd.tenant_id, run_id=run_id)
        raise
    deps.relay.kick()  # the jobs go out while the answer is read
    async with deps.engine.connect() as conn:  # as it is now: its first files may be done already
        return await store.run_body(conn, await store.load_run(conn, cmd.tenant_id, run_id))


def _first_jobs(deps: Deps, cmd: CreateRun, run_id: str, template: dict, files: list[dict], policy,
                trace_id: str | None) -> list[dict]:
    """The outbox rows of the new run's jobs. per_file: one expansion row stands for every
    job (the relay builds them from the files written, a page at a time); batch: the one
    job itself. Refused (413) when the biggest job would not fit in a message: built here,
    before the charge, from the run as it will be inserted (round and generation start at 0)."""
    run = {"id": run_id, "tenant_id": cmd.tenant_id, "template_id": template["id"], "mode": cmd.mode, "round": 0,
           "generation": 0, "trace_id": trace_id}
    if cmd.mode == "per_file":
        biggest = max(files, key=lambda f: len(f["name"]) + len(f["url"] or "") + len(f["content_b64"] or ""))
        count = cmd.staged.count if cmd.staged else len(cmd.files)  # files: only the biggest, when staged
        rows = [jobs.expansion_row(deps.names, run, policy, count=count)]
        checked = jobs.job_messages(deps.names, run, template, [biggest], policy)
    else:
        checked = jobs.job_messages(deps.names, run, template, files, policy)
        rows = [outbox.row(m.subject, m.msg_id, m.data, m.headers) for m in checked]
    refuse_oversized(checked, deps.max_payload)
    return rows


def refuse_oversized(messages: list, max_payload: int) -> None:
    """A 413 ``payload_too_large`` when the biggest of these jobs would not fit in a message:
    sent, the broker would refuse it, and its files would end ERROR (JobTooLarge) after
    they were charged."""
    job = max(messages, key=lambda m: len(m.data), default=None)
    if job is not None and not fits(job, max_payload):
        raise ServiceError("payload_too_large", too_large_message(len(job.data), max_payload),
                           {"job_bytes": len(job.data), "max_payload": max_payload})
