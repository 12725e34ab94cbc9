"""Recovery: resume a FAILED or stuck run from its files' checkpoints, free of charge.

Recovery re-enqueues rather than executing anything itself, and re-publishing a job whose
original is still alive only costs a duplicate execution: the coordinator applies one
terminal result per file and round, so duplicate recovery requests are harmless.
"""

from __future__ import annotations

from collections import Counter

import orjson
from sqlalchemy import text

from shared.db import transaction
from shared.messages import ServiceError
from services.coordinator import jobs, outbox, store, timeline
from services.coordinator.context import Deps
from services.coordinator.run_events import run_event_row
from services.coordinator.schemas import Restore, RunRef

_RESUME = text(
    # A FAILED run (fail_fast, recovery gave up) left RUNNING in this round already; reopen
    # the round's fan-in so that finishing it completes the run.
    "UPDATE coordinator.runs SET status = 'RUNNING', recovering = true, recovery_told = true, generation = generation + 1, "
    " fanin_round = LEAST(fanin_round, round - 1), "
    " needs_attention = false, attention_reason = NULL, finished_at = NULL, updated_at = now(), last_progress_at = now() "
    "WHERE id = :r RETURNING *"
)


async def republish_pending(conn, deps: Deps, run: dict, actor: str, *, announce: bool = True) -> int:
    """Re-publish every PENDING file's job of ``run`` (already locked) and mark it recovering.
    ``announce``: tell the run's users that recovery started (not when they were told
    already and it has not ended since: the sweep's next attempt, or jobs first awaited,
    then found lost); the timeline records every attempt."""
    template = await store.load_template(conn, run["tenant_id"], run["template_id"], include_archived=True)
    policy = await store.retry_policy(conn, run["tenant_id"])
    run = dict((await conn.execute(_RESUME, {"r": run["id"]})).mappings().one())
    await jobs.drop_expansions(conn, run["id"])
    rows, pending = await _pending_job_rows(conn, deps, run, template, policy, rounds=(0, run["round"]))
    told = [run_event_row(deps.names, run, "recovery_started", "Recovery started", unique=f"g{run['generation']}")]
    await outbox.add(conn, rows + (told if announce else []))
    await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "recovery_started", actor,
                                               pending_files=pending, generation=run["generation"]))
    return pending


_COUNT_PENDING = text(
    "SELECT count(*) FROM coordinator.files WHERE run_id = :r AND status = 'PENDING' AND round BETWEEN :first AND :last "
    "AND NOT idx = ANY(CAST(:reopened AS int[]))"
)


async def _pending_job_rows(conn, deps: Deps, run: dict, template: dict, policy, *, rounds: tuple[int, int],
                            reopened: frozenset[int] = frozenset()) -> tuple[list[dict], int]:
    """The outbox rows that give the run's PENDING files in ``rounds`` (but ``reopened``) their
    jobs again, and how many files they are. per_file: one expansion row, which builds the
    jobs from the table a page at a time; so the files are only counted here (loaded, a
    stuck run of 100,000 files was 100,000 rows in memory, in the sweep's transaction)."""
    suffix = f":rec{run['generation']}"
    if run["mode"] == "per_file":
        count = (await conn.execute(_COUNT_PENDING, {"r": run["id"], "first": rounds[0], "last": rounds[1],
                                                     "reopened": sorted(reopened)})).scalar_one()
        return ([jobs.expansion_row(deps.names, run, policy, count=count, rounds=rounds, msg_suffix=suffix)]
                if count else []), count
    files = [f for f in await store.load_files(conn, run["id"], statuses=("PENDING",)) if f["idx"] not in reopened]
    return jobs.pending_rows(deps.names, run, template, files, policy, rounds=rounds, msg_suffix=suffix), len(files)


async def stopped_pending_rows(conn, deps: Deps, before: dict, run: dict, template: dict, policy,
                               reopened: set[int], *, new_round: bool = True) -> list[dict]:
    """Jobs for the PENDING files of a run that was FAILED (``before``) and is reopened by an
    action on some of its files: fail_fast stopped their jobs (executors skip them), and a
    RUNNING run whose other files can never run would wait for the sweep's lease to end.
    ``new_round``: the action moved the run to a new round (the reopened files' own, with
    jobs of their own); the rest are in the rounds before it. Else they are in any round."""
    if before["status"] != "FAILED":
        return []
    await jobs.drop_expansions(conn, run["id"])
    last = run["round"] - 1 if new_round else run["round"]
    rows, _ = await _pending_job_rows(conn, deps, run, template, policy, rounds=(0, last), reopened=frozenset(reopened))
    return rows


# A FAILED run with nothing pending (its last files finished after recovery gave up, or
# fail_fast tripped on its last file) is resumed and finished at once: its outcome is
# known, and nothing else could ever move it out of FAILED.
_FINISH = text(
    "UPDATE coordinator.runs SET "
    " status = CASE WHEN failed + errored > 0 THEN 'COMPLETED_WITH_ERRORS' ELSE 'COMPLETED' END, "
    " needs_attention = failed > 0, attention_reason = CASE WHEN failed > 0 THEN 'failed' END, "
    " recovering = false, recovery_noticed = false, recovery_told = false, recovery_failures = 0, "
    " finished_at = now(), updated_at = now() "
    "WHERE id = :r RETURNING *"
)


async def recover(deps: Deps, cmd: RunRef) -> dict:
    async with transaction(deps.engine) as conn:
        run = await store.load_run(conn, cmd.tenant_id, cmd.run_id, lock=True)
        if run["status"] == "FAILED" and run["pending"] == 0:
            run = await _finish(conn, deps, run, cmd.actor)
        else:
            await _check_recoverable(conn, deps, run)
            # Its users were told this stall's recovery started already (the sweep): not again.
            # An operator's Recover starts the sweep's count of failed attempts over: one
            # after the sweep gave up must not be given up again at its first look.
            await conn.execute(text("UPDATE coordinator.runs SET recovery_failures = 0 WHERE id = :r"), {"r": run["id"]})
            await republish_pending(conn, deps, run, cmd.actor, announce=not run["recovery_told"])
            run = await store.load_run(conn, cmd.tenant_id, cmd.run_id)
        body = await store.run_body(conn, run)
    deps.relay.kick()
    return body


async def _check_recoverable(conn, deps: Deps, run: dict) -> None:
    if run["status"] not in ("FAILED", "RUNNING") or run["pending"] == 0:
        raise ServiceError("run_not_recoverable",
                           f"a {run['status']} run with {run['pending']} pending file(s) has nothing to recover"
                           # Continue takes a finished run's FAILED files, never a cancelled run's.
                           + ("; use Continue (retry-failed) for FAILED files"
                              if run["failed"] and run["status"] != "CANCELLED" else ""))
    if run["status"] == "RUNNING" and not await _stuck(conn, deps, run):
        raise ServiceError("run_not_recoverable", "the run is running and making progress")


async def _stuck(conn, deps: Deps, run: dict) -> bool:
    """Whether a RUNNING run made no progress for the recovery lease (the sweep's rule)."""
    return (await conn.execute(text(f"SELECT {store.STUCK_SQL} FROM coordinator.runs WHERE id = :r"),
                               {"lease": deps.settings.recovery_lease_s, "r": run["id"]})).scalar_one()


async def _finish(conn, deps: Deps, run: dict, actor: str) -> dict:
    run = dict((await conn.execute(_FINISH, {"r": run["id"]})).mappings().one())
    kind = run["status"].lower()
    # A recovery all the same, as users are told of every one: started, and done at once.
    await outbox.add(conn, [
        run_event_row(deps.names, run, "recovery_started", "Recovery started", unique=f"finish{run['generation']}"),
        run_event_row(deps.names, run, "recovered", "Recovery succeeded: the run finished",
                      unique=f"finish{run['generation']}"),
        run_event_row(deps.names, run, kind, unique=f"finish{run['generation']}")])
    await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], f"run_{kind}", actor, round=run["round"],
                                               by="recover"))
    return run


async def _refuse_live_jobs(conn, deps: Deps, run: dict, files: list[dict], file_index: int | None) -> None:
    """A PENDING file of a RUNNING run that is making progress has its job out: restored,
    it would run twice (the old job to its end, its results ignored as an older round's).
    A stuck run's are what a restore is for; a FAILED run's were stopped."""
    if run["status"] != "RUNNING" or not any(f["status"] == "PENDING" for f in files) or await _stuck(conn, deps, run):
        return
    if file_index is not None:
        raise ServiceError("file_pending", f"file {file_index} is still running: restored now, it would run twice; "
                                           "restore it once it has ended")
    raise ServiceError("run_running", "the run is running and making progress: its PENDING files would run twice; "
                                      "restore once it has ended, or name a file that has ended (file_index)")


async def restore(deps: Deps, cmd: Restore) -> dict:
    """Support's manual restore: rewind files to an earlier checkpoint and resume them."""
    async with transaction(deps.engine) as conn:
        run = await store.load_run(conn, cmd.tenant_id, cmd.run_id, lock=True)
        if run["status"] == "CANCELLED":
            raise ServiceError("conflict", "a cancelled run cannot be restored")
        was = run
        template = await store.load_template(conn, run["tenant_id"], run["template_id"], include_archived=True)
        if cmd.checkpoint_step >= len(template["steps"]):
            raise ServiceError("bad_request", f"checkpoint_step must be below {len(template['steps'])}")
        files = await store.load_files(conn, run["id"])
        if cmd.file_index is not None:
            files = [f for f in files if f["idx"] == cmd.file_index]
            if not files:
                raise store.not_found("file", f"{cmd.run_id}/{cmd.file_index}")
        files = [f for f in files if f["status"] != "CANCELLED"]
        await _refuse_live_jobs(conn, deps, run, files, cmd.file_index)
        for f in files:
            if cmd.checkpoint_step >= 0 and str(cmd.checkpoint_step) not in (f["step_outputs"] or {}):
                raise ServiceError("bad_request", f"file {f['idx']} has no checkpoint at step {cmd.checkpoint_step}")
        moved = Counter(f["status"].lower().replace("error", "errored") for f in files)
        counts = {name: -n for name, n in moved.items() if name != "pending"}
        new_round = run["round"] + 1
        restored = []
        for f in files:
            output = (f["step_outputs"] or {}).get(str(cmd.checkpoint_step)) if cmd.checkpoint_step >= 0 else None
            restored.append(dict((await conn.execute(text(
                # A restore is free: a file that had finished used its charge, so it is no longer
                # charged for anything a cancel could refund (a PENDING file keeps its unused one).
                "UPDATE coordinator.files SET status = 'PENDING', round = :round, attempts = 0, "
                " charge_key = CASE WHEN status = 'PENDING' THEN charge_key END, "
                " checkpoint_step = :cp, checkpoint_output = CAST(:cpo AS jsonb), updated_at = now() "
                "WHERE run_id = :r AND idx = :i RETURNING *"),
                {"round": new_round, "cp": cmd.checkpoint_step if cmd.checkpoint_step >= 0 else None,
                 "cpo": None if output is None else orjson.dumps(output).decode(),
                 "r": run["id"], "i": f["idx"]})).mappings().one()))
        if counts:
            counts["pending"] = sum(-n for n in counts.values())
            await store.adjust_counts(conn, run["id"], **counts)
        run = dict((await conn.execute(text(
            "UPDATE coordinator.runs SET status = 'RUNNING', round = :round, generation = generation + 1, finished_at = NULL, "
            " needs_attention = false, attention_reason = NULL, recovering = true, recovery_told = true, "
            " last_progress_at = now() "
            "WHERE id = :r RETURNING *"), {"round": new_round, "r": run["id"]})).mappings().one())
        policy = await store.retry_policy(conn, run["tenant_id"])
        await outbox.add(conn, jobs.job_rows(deps.names, run, template, restored, policy)
                         + await stopped_pending_rows(conn, deps, was, run, template, policy, {f["idx"] for f in restored})
                         + [run_event_row(deps.names, run, "recovery_started", "Restore from checkpoint started")])
        await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "restored", cmd.actor, cmd.file_index,
                                                   checkpoint_step=cmd.checkpoint_step, files=len(restored), round=new_round))
    deps.relay.kick()
    async with deps.engine.connect() as conn:
        return await store.run_body(conn, run)
