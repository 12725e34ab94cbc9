"""SQL for runs, files and templates. Every query is tenant-scoped: a run of another tenant
is simply not found (the gateway answers 404, so run ids cannot be probed)."""

from __future__ import annotations

from typing import Any, get_args

import orjson
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.errors import sqlstate_of
from shared.messages import FileStatus, RetryPolicy, ServiceError
from services.coordinator import pages

# A RUNNING run is stuck when it made no progress for a lease (``:lease`` seconds) and had
# no job in flight nor an announced wait within one either (``quiet_until``: executors'
# heartbeats, liveness.py; retry backoffs and breaker probes, results.py). A step longer
# than the lease, a long backoff and an open breaker are quiet, not stuck: re-publishing
# their jobs would run a second copy of a live one.
STUCK_SQL = ("last_progress_at < now() - make_interval(secs => :lease) "
             "AND (quiet_until IS NULL OR quiet_until < now() - make_interval(secs => :lease))")


def not_found(what: str, ident: str) -> ServiceError:
    return ServiceError("not_found", f"{what} {ident} was not found", {"id": ident})


async def load_template(conn: AsyncConnection, tenant_id: str, template_id: str, *, include_archived: bool) -> dict:
    sql = "SELECT * FROM coordinator.templates WHERE id = :id AND tenant_id = :tenant_id"
    if not include_archived:
        sql += " AND archived_at IS NULL"
    row = (await conn.execute(text(sql), {"id": template_id, "tenant_id": tenant_id})).mappings().first()
    if row is None:
        raise not_found("template", template_id)
    return dict(row)


_OWNED = text("SELECT 1 FROM coordinator.runs WHERE id = :id AND tenant_id = :tenant_id")
_CLAIM_REQUEST = text("SELECT pg_try_advisory_xact_lock(hashtextextended('coordinator.request:' || :id, 0))")
_CLAIM_RUN = text("SELECT pg_try_advisory_xact_lock(hashtextextended('coordinator.run:' || :id, 0))")
_AWAIT_RUN = text("SELECT pg_advisory_xact_lock(hashtextextended('coordinator.run:' || :id, 0))")
_LOCK_NOT_AVAILABLE = "55P03"


async def load_run(conn: AsyncConnection, tenant_id: str | None, run_id: str, *, lock: bool = False,
                   nowait: bool = False, wait_s: float | None = None, request_id: str | None = None) -> dict:
    """``nowait``: a run another *command* is changing right now is refused with 409 at once
    instead of queueing (concurrent "Continue" presses: one wins, the rest are told).
    ``wait_s``: queue behind it for that long instead, then 409 (actions on one file each:
    retries of two FAILED files of a run, pressed together, are both meant).

    ``request_id`` (the gateway's name for a use of an Idempotency-Key): the request is
    claimed too, and while an earlier attempt of it still holds that claim (its client was
    told 503 and sent it again, as told) the answer is a 503, not the 409: a 409 would be
    kept as the key's answer for a day, whether that attempt then applied or not. Another
    request holding the run is the 409, as ever.

    Commands claim the run with a transaction-scoped advisory lock, then wait for the row
    lock as usual: the results consumer holds that row lock for milliseconds while it
    applies events, and a user's press must not be refused because a file just finished.
    """
    if (wait_s is not None or nowait) and tenant_id is not None and (
            await conn.execute(_OWNED, {"id": run_id, "tenant_id": tenant_id})).first() is None:
        # Before the claim, which is keyed by the run alone: another tenant naming this run
        # took it, and was told 409 (the run exists: a probe) while its owner's own Continue
        # was refused as busy.
        raise not_found("run", run_id)
    if request_id is not None and not (await conn.execute(_CLAIM_REQUEST, {"id": request_id})).scalar():
        raise busy(same_request=True)
    if wait_s is not None:
        if nowait:
            raise ValueError("load_run: nowait or wait_s, not both")
        await _await_claim(conn, run_id, wait_s)
    elif nowait and not (await conn.execute(_CLAIM_RUN, {"id": run_id})).scalar():
        raise busy()
    sql = "SELECT * FROM coordinator.runs WHERE id = :id"
    params: dict[str, Any] = {"id": run_id}
    if tenant_id is not None:
        sql += " AND tenant_id = :tenant_id"
        params["tenant_id"] = tenant_id
    if lock:
        sql += " FOR UPDATE"
    row = (await conn.execute(text(sql), params)).mappings().first()
    if row is None:
        raise not_found("run", run_id)
    return dict(row)


_LOCK_TIMEOUT = text("SELECT current_setting('lock_timeout')")
_SET_LOCK_TIMEOUT = text("SELECT set_config('lock_timeout', :value, true)")  # true: for this transaction


def busy(*, same_request: bool = False) -> ServiceError:
    """The answer to a request that found its run being changed by another request, or
    (``same_request``) by an earlier attempt of itself (see load_run)."""
    if same_request:
        return ServiceError("service_unavailable", "an earlier attempt of this request is still being applied: send "
                            "it again in a moment (the same Idempotency-Key will do)")
    return ServiceError("run_running", "another request is changing this run right now")


async def _await_claim(conn: AsyncConnection, run_id: str, wait_s: float) -> None:
    """The run's claim, waited for at most ``wait_s``: the wait is the lock's own timeout
    (set for this transaction, then put back as it was), so nobody polls."""
    was = (await conn.execute(_LOCK_TIMEOUT)).scalar_one()
    await conn.execute(_SET_LOCK_TIMEOUT, {"value": f"{max(1, int(wait_s * 1000))}ms"})
    try:
        await conn.execute(_AWAIT_RUN, {"id": run_id})
    except DBAPIError as exc:
        if sqlstate_of(exc) == _LOCK_NOT_AVAILABLE:
            raise busy() from None
        raise
    await conn.execute(_SET_LOCK_TIMEOUT, {"value": was})


async def load_files(conn: AsyncConnection, run_id: str, *, statuses: tuple[str, ...] | None = None, lock: bool = False) -> list[dict]:
    sql = "SELECT * FROM coordinator.files WHERE run_id = :run_id"
    params: dict[str, Any] = {"run_id": run_id}
    if statuses:
        sql += " AND status = ANY(:statuses)"
        params["statuses"] = list(statuses)
    sql += " ORDER BY idx"
    if lock:
        sql += " FOR UPDATE"
    return [dict(r) for r in (await conn.execute(text(sql), params)).mappings()]


FILE_STATUSES = frozenset(get_args(FileStatus))
FILES_PAGE = 1000  # files per run body at most (and at most pages.PAGE_BYTES of them)


async def run_body(conn: AsyncConnection, run: dict, *, offset: int = 0, limit: int = FILES_PAGE,
                   statuses: list[str] | None = None) -> dict:
    """The run with one page of its files (api.md's run body, plus ``files_page``): those
    from index ``offset`` on, or only those in ``statuses`` (a 100,000-file run's twelve
    failures, without paging through the rest)."""
    from services.coordinator.views import optional_steps, run_view

    sql = "SELECT * FROM coordinator.files WHERE run_id = :r AND idx >= :o"
    params: dict[str, Any] = {"r": run["id"], "o": offset, "l": limit}
    if statuses:
        sql += " AND " + _status_in(statuses)
    rows = (await conn.execute(text(sql + " ORDER BY idx LIMIT :l"), params)).mappings().all()
    steps = (await conn.execute(text("SELECT steps FROM coordinator.templates WHERE id = :t AND tenant_id = :tenant"),
                                {"t": run["template_id"], "tenant": run["tenant_id"]})).scalar_one_or_none() or []
    body = run_view(run, [dict(r) for r in rows], optional_steps(steps))
    body["files"], cut = pages.within_page(_output_omitted_when_too_large(f) for f in body["files"])
    if cut or (statuses and len(rows) == limit):
        next_offset = body["files"][-1]["index"] + 1
    elif statuses:
        next_offset = None
    else:
        next_offset = offset + limit if offset + limit < run["total"] else None
    body["files_page"] = {"offset": offset, "limit": limit, "next_offset": next_offset}
    if statuses:
        body["files_page"]["status"] = list(statuses)
    return body


def _status_in(statuses: list[str]) -> str:
    """``status = 'X'`` or ``status IN ('X', 'Y')``: literals, not a bound array, so that
    PostgreSQL can prove the partial index of the files that ended without success
    (files_ended_without_success: run_id, status, idx) applies, in the cached generic plan
    of a prepared statement too: with a bound status, pages after the fifth on a connection
    could go back to the primary key and read the whole run. One status is an equality, which
    that index can hand over in idx order (PostgreSQL 15 keeps no order across the values
    of an ANY or IN: their files are read, then sorted). Only the six file statuses are ever
    written into the SQL."""
    unknown = set(statuses) - FILE_STATUSES
    if unknown:
        raise ServiceError("validation_error", f"unknown file status {sorted(unknown)[0][:50]!r}",
                           {"fields": {"status": f"one of {', '.join(sorted(FILE_STATUSES))}"}})
    listed = sorted(set(statuses))
    if len(listed) == 1:
        return f"status = '{listed[0]}'"
    return "status IN (" + ", ".join(f"'{s}'" for s in listed) + ")"


def _output_omitted_when_too_large(view: dict) -> dict:
    """A file too large for a page on its own comes without its output, saying so."""
    n = len(orjson.dumps(view))
    if n <= pages.PAGE_BYTES:
        return view
    return {**view, "output": None, "output_omitted": f"{n} bytes: more than a reply can carry"}


async def retry_policy(conn: AsyncConnection, tenant_id: str) -> RetryPolicy:
    row = (
        await conn.execute(text("SELECT policy FROM coordinator.retry_settings WHERE tenant_id = :t"), {"t": tenant_id})
    ).first()
    return RetryPolicy.model_validate(row[0]) if row else RetryPolicy()


async def adjust_counts(conn: AsyncConnection, run_id: str, **deltas: int) -> None:
    """Move files between status counters; the table's CHECK keeps them adding up."""
    sets = ", ".join(f"{name} = {name} + :{name}" for name in deltas)
    await conn.execute(
        text(f"UPDATE coordinator.runs SET {sets}, updated_at = now() WHERE id = :run_id"),
        {"run_id": run_id, **deltas},
    )
