"""Continue (seed 001): retry a run's FAILED files (charged) and PENDING files (free).

Order of the checks is the contract's: 409 while RUNNING; 400 when COMPLETED, when no file
is FAILED or PENDING, or when any such file reached max_retry_count (all or nothing); 402
when credits do not cover the FAILED files. The run row stays locked from the checks to the
commit, so concurrent presses serialise: one 200, the rest 409, one charge.
"""

from __future__ import annotations

from sqlalchemy import text

from shared.db import transaction
from shared.rpc import ensure_caller_waits
from shared.messages import ServiceError
from services.coordinator import credits, jobs, outbox, requests_applied, store, timeline
from services.coordinator.commands.create_run import refuse_oversized
from services.coordinator.commands.templates import refuse_unoffered
from services.coordinator.context import Deps
from services.coordinator.run_events import run_event_row
from services.coordinator.schemas import RetryFailed

_REOPEN_FILES = text(
    "UPDATE coordinator.files SET status = 'PENDING', round = :round, retry_attempt = retry_attempt + 1, "
    # A PENDING file keeps the key it was charged under and never used: it goes on free, and
    # a cancel later refunds that charge (a NULL key would make its credits unrefundable).
    " attempts = 0, charge_key = CASE WHEN status = 'FAILED' THEN :charge_key ELSE charge_key END, updated_at = now() "
    "WHERE run_id = :run_id AND idx = ANY(CAST(:idxs AS int[])) RETURNING *"
)
_REOPEN_RUN = text(
    "UPDATE coordinator.runs SET status = 'RUNNING', round = round + 1, generation = generation + 1, "
    " pending = pending + :failed, failed = failed - :failed, "
    " credits_consumed = credits_consumed + :charged, credits_from_monthly = credits_from_monthly + :m, "
    " credits_from_purchased = credits_from_purchased + :p, needs_attention = false, attention_reason = NULL, "
    " finished_at = NULL, updated_at = now(), last_progress_at = now() "
    "WHERE id = :run_id RETURNING *"
)


def check_retryable(run: dict, files: list[dict]) -> tuple[list[dict], list[dict]]:
    """The contract's refusals, in order; returns (failed, pending) files to retry."""
    if run["status"] == "RUNNING":
        raise ServiceError("run_running", "the run is still running; wait until it stops")
    if run["status"] == "COMPLETED":
        raise ServiceError("run_completed", "the run completed without errors: nothing to retry")
    if run["status"] == "CANCELLED":
        # Cancel is final (it refunded what never ran): a Continue that lost the race with it,
        # or comes later, must not reopen the run and charge again.
        raise ServiceError("conflict", "the run was cancelled; it cannot be continued")
    failed = [f for f in files if f["status"] == "FAILED"]
    pending = [f for f in files if f["status"] == "PENDING"]
    if not failed and not pending:
        raise ServiceError("nothing_to_retry", "no FAILED or PENDING file to retry (ERROR files are never retried)")
    maxed = [f["idx"] for f in failed + pending if f["retry_attempt"] >= run["max_retry_count"]]
    if maxed:
        raise ServiceError(
            "max_retry_count_exceeded",
            f"{len(maxed)} file(s) reached max_retry_count={run['max_retry_count']}",
            {"file_indexes": maxed[:100], "max_retry_count": run["max_retry_count"]},
        )
    return failed, pending


async def retry_failed(deps: Deps, cmd: RetryFailed) -> dict:
    charge: credits.Charge | None = None
    try:
        async with transaction(deps.engine) as conn:
            run = await store.load_run(conn, cmd.tenant_id, cmd.run_id, lock=True, nowait=True,
                                       request_id=cmd.request_id)
            if await requests_applied.applied(conn, cmd.tenant_id, cmd.request_id):
                return await store.run_body(conn, run)  # this very Continue was applied: not again
            files = await store.load_files(conn, run["id"], statuses=("FAILED", "PENDING"))
            failed, pending = check_retryable(run, files)
            # Archived templates still count: the run exists and was paid for (AC15).
            template = await store.load_template(conn, run["tenant_id"], run["template_id"], include_archived=True)
            refuse_unoffered(deps, [s["handler"] for s in template["steps"]])  # before the charge
            policy = await store.retry_policy(conn, run["tenant_id"])
            new_round = run["round"] + 1
            if run["mode"] == "batch":
                # Its one job carries every reopened file with its checkpoint's output: many
                # modest outputs add up past a message, and it would fail them all, charged.
                refuse_oversized(jobs.job_messages(deps.names, {**run, "round": new_round}, template,
                                                   [{**f, "round": new_round} for f in failed + pending], policy),
                                 deps.max_payload)
            key = await credits.fresh_key(deps.credits_db, credits.retry_key(run["id"], new_round))
            amount = len(failed) * template["credits_per_file"]
            charge = await credits.reserve(deps.credits_db, deps.billing, key=key, run_id=run["id"], tenant_id=run["tenant_id"], amount=amount,
                actor=cmd.actor,
            )
            run = dict((await conn.execute(_REOPEN_RUN, {
                "run_id": run["id"], "failed": len(failed), "charged": charge.charged,
                "m": charge.from_monthly, "p": charge.from_purchased,
            })).mappings().one())
            reopened = (await conn.execute(_REOPEN_FILES, {
                "run_id": run["id"], "round": new_round, "charge_key": key if amount else None,
                "idxs": [f["idx"] for f in failed + pending],
            })).mappings().all()
            # per_file: one expansion row, as for a new run, so the relay publishes the round's
            # jobs within the run's window (a Continue after an outage can reopen most of a
            # big run); batch: the one job.
            job_rows = jobs.pending_rows(deps.names, run, template, reopened, policy, rounds=(new_round, new_round),
                                         msg_suffix="")
            await outbox.add(conn, job_rows + [run_event_row(deps.names, run, "retrying")])
            await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "retry_failed", cmd.actor,
                                                       round=new_round, failed_files=len(failed),
                                                       pending_files=len(pending)))
            await credits.apply(conn, charge, run_id=run["id"], tenant_id=run["tenant_id"], actor=cmd.actor)
            await requests_applied.record(conn, cmd.tenant_id, cmd.request_id, run["id"])
            ensure_caller_waits()  # else: rolled back, refunded below
    except BaseException:
        # The run update did not commit: give the credits back (monthly and purchased parts).
        if charge is not None:
            await credits.compensate(deps.credits_db, deps.billing, key=charge.key, tenant_id=cmd.tenant_id, run_id=cmd.run_id)
        raise
    deps.relay.kick()
    async with deps.engine.connect() as conn:
        return await store.run_body(conn, run)
