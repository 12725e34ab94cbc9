"""Operator actions on one file: retry a FAILED file (charged), skip an optional step."""

from __future__ import annotations

from sqlalchemy import text

from shared.db import transaction
from shared.rpc import COMMIT_MARGIN_S, caller_time_left, ensure_caller_waits
from shared.messages import ServiceError
from services.coordinator import credits, jobs, outbox, requests_applied, store, timeline
from services.coordinator.commands.recover import stopped_pending_rows
from services.coordinator.commands.templates import refuse_unoffered
from services.coordinator.context import Deps
from services.coordinator.run_events import run_event_row
from services.coordinator.schemas import FileRef, RetryFile
from services.coordinator.views import optional_steps, skippable

_REOPEN_FILE = text(
    "UPDATE coordinator.files SET status = 'PENDING', round = :round, retry_attempt = retry_attempt + 1, attempts = 0, "
    " charge_key = :charge_key, updated_at = now() WHERE run_id = :run_id AND idx = :idx RETURNING *"
)
# A single-file retry opens a new round for the run: the file's job id carries it, and
# fan-in fires once more when the file is done.
_REOPEN_RUN = text(
    "UPDATE coordinator.runs SET status = 'RUNNING', round = round + 1, generation = generation + 1, "
    " pending = pending + 1, failed = failed - 1, credits_consumed = credits_consumed + :charged, "
    " credits_from_monthly = credits_from_monthly + :m, credits_from_purchased = credits_from_purchased + :p, "
    " needs_attention = false, attention_reason = NULL, finished_at = NULL, updated_at = now(), last_progress_at = now() "
    "WHERE id = :run_id RETURNING *"
)


# How long an action on one file queues behind another request changing its run (another
# file's retry: milliseconds; a Continue of a large run: seconds) before it is a 409: first
# in this process (run_turns.py, holding no connection), then for the run's claim.
QUEUE_S = 5.0


def _queue_s() -> float:
    """QUEUE_S, or less when the caller would stop waiting before it and the work after it
    were done: a 409 then, not a charge rolled back for an answer nobody reads."""
    left = caller_time_left()
    return QUEUE_S if left is None else max(0.05, min(QUEUE_S, (left - 2 * COMMIT_MARGIN_S) / 2))


async def _locked_file(conn, cmd: FileRef, wait_s: float, *, request_id: str | None = None) -> tuple[dict, dict]:
    run = await store.load_run(conn, cmd.tenant_id, cmd.run_id, lock=True, wait_s=wait_s, request_id=request_id)
    row = (
        await conn.execute(text("SELECT * FROM coordinator.files WHERE run_id = :r AND idx = :i"), {"r": run["id"], "i": cmd.file_index})
    ).mappings().first()
    if row is None:
        raise store.not_found("file", f"{cmd.run_id}/{cmd.file_index}")
    return run, dict(row)


async def retry_file(deps: Deps, cmd: RetryFile) -> dict:
    wait_s = _queue_s()
    # By tenant too: another tenant's requests naming this run id fill no place in its queue.
    async with deps.turns.turn((cmd.tenant_id, cmd.run_id), wait_s, request_id=cmd.request_id):
        return await _retry_file(deps, cmd, wait_s)


async def _retry_file(deps: Deps, cmd: RetryFile, wait_s: float) -> dict:
    charge: credits.Charge | None = None
    try:
        async with transaction(deps.engine) as conn:
            run, f = await _locked_file(conn, cmd, wait_s, request_id=cmd.request_id)
            if await requests_applied.applied(conn, cmd.tenant_id, cmd.request_id):
                return await store.run_body(conn, run)  # this very retry was applied: not again
            if run["status"] == "CANCELLED":
                # Cancel is final (it refunded what never ran): nothing of the run is charged again.
                raise ServiceError("conflict", "the run was cancelled; its files cannot be retried")
            if f["status"] == "PENDING":
                raise ServiceError("file_pending", "the file is still in progress")
            if f["status"] != "FAILED":
                raise ServiceError("file_not_failed", f"only a FAILED file can be retried (this one is {f['status']})")
            if f["retry_attempt"] >= run["max_retry_count"]:
                raise ServiceError("max_retry_count_exceeded", f"the file reached max_retry_count={run['max_retry_count']}")
            template = await store.load_template(conn, run["tenant_id"], run["template_id"], include_archived=True)
            refuse_unoffered(deps, [s["handler"] for s in template["steps"]])  # before the charge
            policy = await store.retry_policy(conn, run["tenant_id"])
            key = await credits.fresh_key(deps.credits_db, credits.file_retry_key(run["id"], f["idx"], f["retry_attempt"] + 1))
            amount = template["credits_per_file"]
            charge = await credits.reserve(deps.credits_db, deps.billing, key=key, run_id=run["id"],
                                           tenant_id=run["tenant_id"], amount=amount, actor=cmd.actor)
            was = run
            run = dict((await conn.execute(_REOPEN_RUN, {"run_id": run["id"], "charged": charge.charged,
                                                         "m": charge.from_monthly, "p": charge.from_purchased})).mappings().one())
            f = dict((await conn.execute(_REOPEN_FILE, {"run_id": run["id"], "idx": f["idx"], "round": run["round"],
                                                        "charge_key": key if amount else None})).mappings().one())
            await outbox.add(conn, jobs.job_rows(deps.names, run, template, [f], policy)
                             + await stopped_pending_rows(conn, deps, was, run, template, policy, {f["idx"]})
                             + [run_event_row(deps.names, run, "retrying", unique=f"file{f['idx']}")])
            await timeline.append(
                conn, timeline.entry(run["id"], run["tenant_id"], "file_retry", cmd.actor, f["idx"], round=run["round"]))
            await credits.apply(conn, charge, run_id=run["id"], tenant_id=run["tenant_id"], actor=cmd.actor,
                                file_index=f["idx"])
            await requests_applied.record(conn, cmd.tenant_id, cmd.request_id, run["id"])
            ensure_caller_waits()  # else: rolled back, refunded below
    except BaseException:
        if charge is not None:
            await credits.compensate(deps.credits_db, deps.billing, key=charge.key, tenant_id=cmd.tenant_id, run_id=cmd.run_id)
        raise
    deps.relay.kick()
    async with deps.engine.connect() as conn:
        return await store.run_body(conn, run)


async def skip_file(deps: Deps, cmd: FileRef) -> dict:
    """Skip a file's failed optional step. When it was the file's last step, the file ends
    SKIPPED; otherwise the file goes on with the steps after it (free of charge, in a new
    round of the run), from the output of the step before: skipping an optional step never
    skips the required ones that follow it."""
    wait_s = _queue_s()
    async with deps.turns.turn((cmd.tenant_id, cmd.run_id), wait_s):
        return await _skip_file(deps, cmd, wait_s)


async def _skip_file(deps: Deps, cmd: FileRef, wait_s: float) -> dict:
    async with transaction(deps.engine) as conn:
        run, f = await _locked_file(conn, cmd, wait_s)
        if f["status"] not in ("FAILED", "ERROR"):
            # api.md's one refusal of a skip: a file that has not failed has no failed step
            # that could be optional.
            raise ServiceError("step_not_optional",
                               f"only a FAILED or ERROR file can be skipped (this one is {f['status']})")
        template = await store.load_template(conn, run["tenant_id"], run["template_id"], include_archived=True)
        step = f["failed_step"]
        if not skippable(f, optional_steps(template["steps"])):
            raise ServiceError("step_not_optional", "the file's failed step is not optional; it cannot be skipped")
        counter = "failed" if f["status"] == "FAILED" else "errored"
        if step < len(template["steps"]) - 1:
            run = await _resume_after(conn, deps, run, f, template, counter, cmd.actor)
        else:
            run = await _end_skipped(conn, deps, run, f, template, counter, cmd.actor)
        body = await store.run_body(conn, run)
        ensure_caller_waits()  # else rolled back: a 503 that says nothing was done is true
    deps.relay.kick()
    return body


async def _end_skipped(conn, deps: Deps, run: dict, f: dict, template: dict, counter: str, actor: str) -> dict:
    await conn.execute(text("UPDATE coordinator.files SET status = 'SKIPPED', updated_at = now() WHERE run_id = :r AND idx = :i"),
                       {"r": run["id"], "i": f["idx"]})
    await store.adjust_counts(conn, run["id"], **{counter: -1, "skipped": 1})
    if run["status"] == "FAILED":
        return await _failed_run_after_skip(conn, deps, run, f, template, actor)
    # Skipping the last error of a finished run finishes it cleanly.
    before = run["status"]
    run = dict((await conn.execute(text(
        "UPDATE coordinator.runs SET status = CASE WHEN status = 'COMPLETED_WITH_ERRORS' AND failed + errored = 0 "
        " THEN 'COMPLETED' ELSE status END, needs_attention = needs_attention AND failed > 0, "
        " attention_reason = CASE WHEN needs_attention AND failed > 0 THEN attention_reason END "
        "WHERE id = :r RETURNING *"), {"r": run["id"]})).mappings().one())
    await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "file_skipped", actor, f["idx"],
                                               step=f["failed_step"]))
    if run["status"] != before:
        # The run's outcome changed: whoever was told "finished with errors" (SSE,
        # notifications, webhooks) is told it finished after all.
        await outbox.add(conn, [run_event_row(deps.names, run, "completed", "the last error was skipped",
                                              unique=f"skip{f['idx']}")])
    return run


# A FAILED run one of whose failures was skipped goes on with its PENDING files, their
# stopped jobs published again under a new generation; with none left it finishes. Left
# FAILED, it was never finished, and no longer flagged for anyone.
_REOPEN_OR_FINISH = text(
    "UPDATE coordinator.runs SET "
    " status = CASE WHEN pending > 0 THEN 'RUNNING' WHEN failed + errored > 0 THEN 'COMPLETED_WITH_ERRORS' "
    "  ELSE 'COMPLETED' END, "
    " generation = generation + CASE WHEN pending > 0 THEN 1 ELSE 0 END, "
    # fail_fast recorded this round's fan-in: the round fans in again when its files are done.
    " fanin_round = CASE WHEN pending > 0 THEN round - 1 ELSE fanin_round END, "
    " needs_attention = pending = 0 AND failed > 0, "
    " attention_reason = CASE WHEN pending = 0 AND failed > 0 THEN 'failed' END, "
    " recovering = false, recovery_noticed = false, recovery_told = false, recovery_failures = 0, "
    " finished_at = CASE WHEN pending > 0 THEN NULL ELSE now() END, updated_at = now(), last_progress_at = now() "
    "WHERE id = :r RETURNING *"
)


async def _failed_run_after_skip(conn, deps: Deps, was: dict, f: dict, template: dict, actor: str) -> dict:
    """An operator's skip on a FAILED run resumes it, as a skip of a step before the last
    does (``_resume_after``): its stopped PENDING files run again and it ends as its files
    do (COMPLETED_WITH_ERRORS, flagged, if another file failed too)."""
    run = dict((await conn.execute(_REOPEN_OR_FINISH, {"r": was["id"]})).mappings().one())
    once = f"skip{f['idx']}g{run['generation']}"
    await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "file_skipped", actor, f["idx"],
                                               step=f["failed_step"]))
    if run["status"] == "RUNNING":
        policy = await store.retry_policy(conn, run["tenant_id"])
        rows = await stopped_pending_rows(conn, deps, was, run, template, policy, set(), new_round=False)
        await outbox.add(conn, rows + [run_event_row(deps.names, run, "retrying",
                                                     f"file {f['idx']} was skipped: the run goes on", unique=once)])
    else:
        kind = run["status"].lower()
        await outbox.add(conn, [run_event_row(deps.names, run, kind, f"file {f['idx']} was skipped", unique=once)])
        await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], f"run_{kind}", actor,
                                                   round=run["round"], by="skip"))
    return run


async def _resume_after(conn, deps: Deps, run: dict, f: dict, template: dict, counter: str, actor: str) -> dict:
    if run["status"] == "CANCELLED":
        raise ServiceError("conflict", "the run was cancelled; its files cannot go on")
    step = f["failed_step"]
    was = run
    run = dict((await conn.execute(text(
        "UPDATE coordinator.runs SET status = 'RUNNING', round = round + 1, generation = generation + 1, "
        f" pending = pending + 1, {counter} = {counter} - 1, needs_attention = false, attention_reason = NULL, "
        " finished_at = NULL, updated_at = now(), last_progress_at = now() WHERE id = :r RETURNING *"),
        {"r": run["id"]})).mappings().one())
    # As if the skipped step had completed with the output of the one before it (or none):
    # the job starts after it. Free: the file's charge was used by the attempts made.
    f = dict((await conn.execute(text(
        "UPDATE coordinator.files SET status = 'PENDING', round = :round, attempts = 0, checkpoint_step = :step, "
        " charge_key = NULL, last_error = NULL, failed_step = NULL, updated_at = now() "
        "WHERE run_id = :r AND idx = :i RETURNING *"), {"round": run["round"], "step": step, "r": run["id"], "i": f["idx"]})
    ).mappings().one())
    policy = await store.retry_policy(conn, run["tenant_id"])
    await outbox.add(conn, jobs.job_rows(deps.names, run, template, [f], policy)
                     + await stopped_pending_rows(conn, deps, was, run, template, policy, {f["idx"]})
                     + [run_event_row(deps.names, run, "retrying", f"file {f['idx']} goes on after skipping step {step}",
                                      unique=f"skip{f['idx']}")])
    await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "file_skipped", actor, f["idx"], step=step,
                                               resumes_at=step + 1, round=run["round"]))
    return run
