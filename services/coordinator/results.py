"""Applying file events from executors: at most once each, exact counters, fan-in once.

This is the hot path of the whole system (one event per file at thousands per second), so
a whole fetched batch is applied in one transaction with set-based SQL: an inbox insert
that tells which events are new, one UPDATE of the files it touches, one UPDATE per run of
the counters, and one conditional UPDATE that fires fan-in for runs with nothing pending.

Rules, in order of precedence:
* an event already in the inbox (same Nats-Msg-Id) is ignored: redelivery changes nothing;
* an event of another round than the file's current one is ignored (a late delivery);
* a file that is not PENDING does not change status again in the same round, whatever
  arrives: first terminal result wins, so a job redelivered after its result was recorded
  is harmless;
* checkpoints only move forward;
* an event naming another tenant than its run's is ignored (a job or event forged or
  garbled on the bus must not decide another tenant's file);
* a ``deferred`` event changes no file: it flags its RUNNING run ``breaker_open`` for
  operators, until the run progresses again.
"""

from __future__ import annotations

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.messages import FileEvent
from shared.subjects import Names
from services.coordinator import outbox, timeline
from services.coordinator.file_results import FileState, fold, json_text, may_apply
from services.coordinator.run_events import file_failed_row, run_event_row
from services.coordinator.run_stops import stop_row

log = structlog.get_logger(__name__)

_NEW_IN_INBOX = text(
    "INSERT INTO coordinator.inbox (msg_id) SELECT unnest(CAST(:ids AS text[])) "
    "ON CONFLICT DO NOTHING RETURNING msg_id"
)
# Every writer locks the run row before touching its files, so runs are the only locks
# taken here, in id order (no deadlock between coordinator replicas).
_LOCK_RUNS = text(
    "SELECT id, tenant_id, status, round, failure_policy, trace_id FROM coordinator.runs "
    "WHERE id = ANY(CAST(:ids AS text[])) ORDER BY id FOR UPDATE"
)
_LOAD_FILES = text(
    "SELECT f.run_id, f.idx, f.name, f.status, f.round, f.attempts, f.checkpoint_step "
    "FROM coordinator.files f JOIN unnest(CAST(:run_ids AS text[]), CAST(:idxs AS int[])) AS k(run_id, idx) "
    "ON f.run_id = k.run_id AND f.idx = k.idx"
)
_UPDATE_FILES = text(
    "UPDATE coordinator.files f SET status = u.status, attempts = u.attempts, checkpoint_step = u.cp, "
    " checkpoint_output = COALESCE(CAST(u.cpo AS jsonb), f.checkpoint_output), "
    " step_outputs = CASE WHEN u.outs IS NULL THEN f.step_outputs ELSE f.step_outputs || CAST(u.outs AS jsonb) END, "
    " output = COALESCE(CAST(u.output AS jsonb), f.output), "
    # A success clears the error of an earlier attempt or round (the timeline keeps it):
    # a SUCCEEDED file shows no error.
    " last_error = CASE WHEN u.status = 'SUCCEEDED' THEN NULL ELSE COALESCE(CAST(u.err AS jsonb), f.last_error) END, "
    " failed_step = CASE WHEN u.status = 'SUCCEEDED' THEN NULL ELSE COALESCE(u.fs, f.failed_step) END, "
    " updated_at = now() "
    "FROM unnest(CAST(:run_ids AS text[]), CAST(:idxs AS int[]), CAST(:statuses AS text[]), CAST(:attempts AS int[]), "
    " CAST(:cps AS int[]), CAST(:cpos AS text[]), CAST(:outputs AS text[]), CAST(:errs AS text[]), CAST(:fss AS int[]), "
    " CAST(:outs AS text[])) AS u(run_id, idx, status, attempts, cp, cpo, output, err, fs, outs) "
    "WHERE f.run_id = u.run_id AND f.idx = u.idx"
)
# Progress also ends the attention a run needed only because it was not moving: recovered
# by the sweep (stuck: any event), or waiting for an open breaker (breaker_open: a file
# succeeded or checkpointed; see file_results.RunDelta.advanced).
_UPDATE_COUNTS = text(
    "UPDATE coordinator.runs r SET pending = pending - u.done, succeeded = succeeded + u.s, failed = failed + u.f, "
    " errored = errored + u.e, updated_at = now(), last_progress_at = now(), "
    " needs_attention = CASE WHEN r.attention_reason = 'stuck' OR (r.attention_reason = 'breaker_open' AND u.adv) "
    "  THEN false ELSE r.needs_attention END, "
    " attention_reason = CASE WHEN r.attention_reason = 'stuck' OR (r.attention_reason = 'breaker_open' AND u.adv) "
    "  THEN NULL ELSE r.attention_reason END, "
    # A retry's announced backoff: quiet until then is not stuck (recovery.py). A recovery
    # followed by progress worked: it does not count towards giving the run up, and the
    # next stall is a new one, told anew.
    " quiet_until = CASE WHEN u.q > 0 THEN GREATEST(r.quiet_until, now() + make_interval(secs => u.q / 1000.0)) "
    "  ELSE r.quiet_until END, recovery_failures = 0, recovery_told = false "
    "FROM unnest(CAST(:ids AS text[]), CAST(:done AS int[]), CAST(:s AS int[]), CAST(:f AS int[]), CAST(:e AS int[]), "
    " CAST(:q AS bigint[]), CAST(:adv AS boolean[])) AS u(id, done, s, f, e, q, adv) WHERE r.id = u.id"
)
# Quiet until the breaker's next probe (the deferral's delay) is not stuck either.
_WAITING_ON_BREAKER = text(
    "UPDATE coordinator.runs r SET updated_at = now(), "
    " quiet_until = GREATEST(r.quiet_until, now() + make_interval(secs => u.q / 1000.0)), "
    " attention_reason = CASE WHEN r.needs_attention THEN r.attention_reason ELSE 'breaker_open' END, "
    " needs_attention = true "
    "FROM unnest(CAST(:ids AS text[]), CAST(:q AS bigint[])) AS u(id, q) WHERE r.id = u.id AND r.status = 'RUNNING'"
)
_FAIL_FAST = text(
    "UPDATE coordinator.runs SET status = 'FAILED', fanin_round = round, finished_at = now(), updated_at = now(), "
    # A recovery under way ends with the run: a Continue's fan-in is no "Recovery succeeded".
    " needs_attention = true, attention_reason = 'failed', recovering = false, recovery_noticed = false, recovery_told = false "
    "WHERE id = ANY(CAST(:ids AS text[])) AND status = 'RUNNING' AND failure_policy = 'fail_fast' "
    "RETURNING *, (SELECT recovering OR recovery_noticed FROM coordinator.runs o WHERE o.id = runs.id) AS was_recovering"
)
# Fan-in: fires once per round because it moves the run out of RUNNING and records the
# round, in the same statement, under the run's row lock.
_FAN_IN = text(
    "UPDATE coordinator.runs SET "
    " status = CASE WHEN failed + errored > 0 THEN 'COMPLETED_WITH_ERRORS' ELSE 'COMPLETED' END, "
    " fanin_round = round, finished_at = now(), updated_at = now(), "
    " needs_attention = failed > 0, attention_reason = CASE WHEN failed > 0 THEN 'failed' END, "
    " recovering = false, recovery_noticed = false, recovery_told = false, recovery_failures = 0 "
    "WHERE id = ANY(CAST(:ids AS text[])) AND status = 'RUNNING' AND pending = 0 AND fanin_round < round "
    "RETURNING *, (SELECT recovering OR recovery_noticed FROM coordinator.runs o WHERE o.id = runs.id) AS was_recovering"
)


# A run the sweep gave up on (no progress through its recoveries) whose files all finished
# after all (its jobs were slow, not lost): finished as fan-in would have, and its users
# told so. Left FAILED, it said "Recovery failed" of a run that had done every file.
_FINISHED_AFTER_GIVING_UP = text(
    "UPDATE coordinator.runs SET "
    " status = CASE WHEN failed + errored > 0 THEN 'COMPLETED_WITH_ERRORS' ELSE 'COMPLETED' END, "
    " finished_at = now(), updated_at = now(), "
    " needs_attention = failed > 0, attention_reason = CASE WHEN failed > 0 THEN 'failed' END, "
    " recovering = false, recovery_noticed = false, recovery_told = false, recovery_failures = 0 "
    "WHERE id = ANY(CAST(:ids AS text[])) AND status = 'FAILED' AND attention_reason = 'recovery_failed' "
    " AND pending = 0 RETURNING *"
)


async def apply_events(conn: AsyncConnection, names: Names, events: list[FileEvent]) -> list[dict]:
    """Apply ``events`` in one transaction; returns the outbox rows it wrote (for counting)."""
    if not events:
        return []
    runs = {r["id"]: dict(r) for r in (await conn.execute(_LOCK_RUNS, {"ids": sorted({e.run_id for e in events})})).mappings()}
    keys = sorted({(e.run_id, e.file_index) for e in events if e.run_id in runs})
    if not keys:
        log.warning("results.unknown_runs", events=len(events), run_ids=sorted({e.run_id[:100] for e in events})[:10])
        return []
    rows = await conn.execute(_LOAD_FILES, {"run_ids": [k[0] for k in keys], "idxs": [k[1] for k in keys]})
    # Positional rows: cheaper than looking every column up by name, once per event.
    files = {(r[0], r[1]): FileState(*r) for r in rows}
    # What can never apply is set aside before the inbox sees it: recorded, a forged or
    # garbled event would take the message id of the real one, which would then be dropped
    # as a repeat.
    events = [e for e in events if may_apply(e, runs, files)]
    fresh = set((await conn.execute(_NEW_IN_INBOX, {"ids": [e.msg_id for e in events]})).scalars()) if events else set()
    events = [e for e in events if e.msg_id in fresh]

    folded = fold(events, runs, files)
    deltas, waiting, log_entries = folded.deltas, folded.waiting, folded.log_entries
    changed = [f for f in files.values() if f.changed]
    if changed:
        await conn.execute(_UPDATE_FILES, {
            "run_ids": [f.run_id for f in changed], "idxs": [f.idx for f in changed],
            "statuses": [f.status for f in changed], "attempts": [f.attempts for f in changed],
            "cps": [f.cp for f in changed], "cpos": [f.cpo for f in changed], "outputs": [f.output for f in changed],
            "errs": [f.err for f in changed], "fss": [f.fs for f in changed],
            "outs": [json_text(f.outs) if f.outs else None for f in changed],
        })
    # Before a fail_fast's "Run failed" that a failure below may cause: users hear why first.
    out_rows: list[dict] = [file_failed_row(names, runs[e.run_id], e) for e in folded.failed]
    if deltas:
        ids = sorted(deltas)
        await conn.execute(_UPDATE_COUNTS, {
            "ids": ids, "done": [deltas[i].done for i in ids], "s": [deltas[i].s for i in ids],
            "f": [deltas[i].f for i in ids], "e": [deltas[i].e for i in ids], "q": [deltas[i].quiet_ms for i in ids],
            "adv": [deltas[i].advanced for i in ids],
        })
        tripped = [i for i in ids if deltas[i].f or deltas[i].e]
        if tripped:
            for run in (await conn.execute(_FAIL_FAST, {"ids": tripped})).mappings():
                # A run fails fast once per generation: a Recover (a new generation) may see it
                # fail again in the same round, and its users must hear that too.
                once = f"g{run['generation']}"
                # What tripped it: a file FAILED after its retries, or one in ERROR (a permanent
                # error, never retried).
                cause = ("a file failed after its retries" if deltas[run["id"]].f else
                         "a file ended in ERROR (a permanent error, not retried)")
                out_rows.append(run_event_row(names, run, "failed", f"fail_fast: {cause}", unique=once))
                if run["was_recovering"]:  # the recovery under way ends here, and its users hear how
                    out_rows.append(run_event_row(names, run, "recovery_failed", f"{cause} (fail_fast)", unique=once))
                    log_entries.append(timeline.entry(run["id"], run["tenant_id"], "recovery_failed", "system",
                                                      reason="fail_fast", round=run["round"]))
                out_rows.append(stop_row(names, run))  # its other files stay PENDING, unrun
                log_entries.append(timeline.entry(run["id"], run["tenant_id"], "run_failed", "system",
                                                  reason="fail_fast", round=run["round"]))
        for run in (await conn.execute(_FAN_IN, {"ids": ids})).mappings():
            kind = "completed" if run["status"] == "COMPLETED" else "completed_with_errors"
            once = f"g{run['generation']}"  # a round's fan-in reopened by a Recover fires again
            out_rows.append(run_event_row(names, run, kind, unique=once))
            if run["was_recovering"]:
                out_rows.append(run_event_row(names, run, "recovered", "Recovery succeeded: the run finished",
                                              unique=once))
                log_entries.append(timeline.entry(run["id"], run["tenant_id"], "recovered", "system", round=run["round"]))
            log_entries.append(timeline.entry(run["id"], run["tenant_id"], f"run_{kind}", "system", round=run["round"],
                                              succeeded=run["succeeded"], failed=run["failed"], errored=run["errored"]))
        for run in (await conn.execute(_FINISHED_AFTER_GIVING_UP, {"ids": ids})).mappings():
            kind = "completed" if run["status"] == "COMPLETED" else "completed_with_errors"
            once = f"g{run['generation']}late"  # its round's fan-in was its giving up
            out_rows.append(run_event_row(names, run, kind, unique=once))
            out_rows.append(run_event_row(names, run, "recovered", "Recovery succeeded: every file finished after all",
                                          unique=once))
            log_entries.append(timeline.entry(run["id"], run["tenant_id"], "recovered", "system", round=run["round"]))
            log_entries.append(timeline.entry(run["id"], run["tenant_id"], f"run_{kind}", "system", round=run["round"],
                                              succeeded=run["succeeded"], failed=run["failed"], errored=run["errored"]))
    if waiting:
        ids = sorted(waiting)
        await conn.execute(_WAITING_ON_BREAKER, {"ids": ids, "q": [waiting[i] for i in ids]})
    await outbox.add(conn, out_rows)
    await timeline.append(conn, *log_entries)
    return out_rows
