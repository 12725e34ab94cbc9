"""The recovery sweep: on every coordinator start and then periodically.

* credit intents left pending by a crash are compensated; owed refunds are paid (beside
  the rest, in a task of its own: a hung billing must not hold up the recovery of runs);
* RUNNING runs with PENDING files, no progress for a lease (database clock, so replicas
  agree), no job in flight and no announced wait (store.STUCK_SQL), and no job left in the
  jobs stream (job_queue.py) have their pending jobs re-published from their checkpoints,
  free of charge, and are flagged ``stuck`` for operators until they progress again;
* a run that stays stuck through ``recovery_max_failures`` recoveries goes FAILED and is
  flagged ``needs_attention`` (reason ``recovery_failed``) for an operator.

A row lock with SKIP LOCKED hands each stuck run to one replica per pass.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from sqlalchemy import text

from shared.db import transaction
from services.coordinator import credits, inbox, job_queue, outbox, requests_applied, run_retention, store, timeline
from services.coordinator.commands import staged_files
from services.coordinator.commands.cancel import pay_refunds_due, prune_paid_refunds
from services.coordinator.commands.recover import republish_pending
from services.coordinator.context import Deps
from services.coordinator.run_events import run_event_row

log = structlog.get_logger(__name__)

_STUCK = "status = 'RUNNING' AND pending > 0 AND " + store.STUCK_SQL
# Tenants first: whether a run's jobs are still in the broker is known per tenant (job
# subjects are), and a tenant whose runs wait behind its own backlog must not crowd the
# runs of other tenants out of a pass.
_CANDIDATE_TENANTS = text(f"SELECT tenant_id FROM coordinator.runs WHERE {_STUCK} "
                          "GROUP BY tenant_id ORDER BY min(last_progress_at) LIMIT 200")
_LOCK_LOST = text(f"SELECT * FROM coordinator.runs WHERE tenant_id = ANY(CAST(:tenants AS text[])) AND {_STUCK} "
                  "ORDER BY last_progress_at LIMIT 50 FOR UPDATE SKIP LOCKED")
_FLAG_STUCK = text("UPDATE coordinator.runs SET needs_attention = true, attention_reason = 'stuck', recovery_noticed = true, "
                   " recovery_told = true "
                   f"WHERE tenant_id = ANY(CAST(:tenants AS text[])) AND NOT needs_attention AND {_STUCK} "
                   # Told already (an operator's Recover since the last progress): not again.
                   "RETURNING *, (SELECT recovery_told FROM coordinator.runs o WHERE o.id = runs.id) AS told_before")
WAITING_NOTE = "no progress; its jobs come back from the executor that held them"


async def _lost_and_waiting(deps: Deps, tenants: list[str]) -> tuple[list[str], list[str]] | None:
    """Split the tenants of quiet runs into those with no job left in the broker (their
    runs' jobs are lost: re-publish them) and those with some (re-publishing would
    duplicate them). The latter's runs are flagged ``stuck`` only when nothing is queued
    (then what is there neither moves nor says it is alive). None when the broker cannot
    tell: no recovery this pass."""
    if deps.js is None:
        return tenants, []
    try:
        busy = await job_queue.tenants_with_jobs(deps.js, deps.names, tenants)
        backlog = await job_queue.undelivered(deps.js, deps.names) if busy else 0
    except Exception as exc:  # NATS away: its jobs may be there; decide next pass
        log.warning("recovery.queue_unknown", error=repr(exc)[:300])
        return None
    return [t for t in tenants if t not in busy], ([t for t in tenants if t in busy] if not backlog else [])


async def settle_credits(deps: Deps) -> dict:
    """Compensate the credit intents a crash left pending, and pay the refunds owed."""
    compensated = await credits.compensate_abandoned(deps.credits_db, deps.billing,
                                                     older_than_s=deps.settings.credit_intent_timeout_s)
    return {"compensated": compensated, "refunds": await pay_refunds_due(deps)}


async def sweep(deps: Deps) -> dict:
    """Find stuck runs: re-publish their jobs, flag them, or give them up."""
    stats = {"recovered": 0, "given_up": 0}
    lease = {"lease": deps.settings.recovery_lease_s}
    async with deps.engine.connect() as conn:
        tenants = list((await conn.execute(_CANDIDATE_TENANTS, lease)).scalars())
    split = await _lost_and_waiting(deps, tenants) if tenants else None
    if split is None:
        return stats
    lost, waiting = split
    async with transaction(deps.engine) as conn:
        if waiting:
            # Its jobs are out with an executor that says nothing (one that died: the ack
            # wait brings them back). Re-publishing would run second copies; the run is
            # listed for operators and its users are told, once per quiet spell.
            flagged = (await conn.execute(_FLAG_STUCK, {"tenants": waiting, **lease})).mappings().all()
            await outbox.add(conn, [run_event_row(deps.names, run, "recovery_started", WAITING_NOTE,
                                                  unique=f"q{run['last_progress_at'].timestamp():.6f}")
                                    for run in flagged if not run["told_before"]])
            await timeline.append(conn, *(timeline.entry(run["id"], run["tenant_id"], "recovery_started",
                                                         "system:recovery", pending_files=run["pending"],
                                                         reason=WAITING_NOTE) for run in flagged))
        for run in (await conn.execute(_LOCK_LOST, {"tenants": lost, **lease})).mappings().all():
            run = dict(run)
            if run["recovering"] and run["recovery_failures"] + 1 >= deps.settings.recovery_max_failures:
                failed = dict((await conn.execute(text(
                    "UPDATE coordinator.runs SET status = 'FAILED', recovering = false, recovery_noticed = false, "
                    " recovery_told = false, "
                    " needs_attention = true, "
                    " attention_reason = 'recovery_failed', recovery_failures = recovery_failures + 1, "
                    " fanin_round = round, finished_at = now(), updated_at = now() WHERE id = :r RETURNING *"),
                    {"r": run["id"]})).mappings().one())
                # Once per giving up: an operator's Recover may start it over in the same round.
                await outbox.add(conn, [run_event_row(deps.names, failed, "recovery_failed",
                                                      "the run made no progress after repeated recoveries",
                                                      unique=f"g{failed['generation']}a{failed['recovery_failures']}")])
                await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "recovery_failed", "system:recovery",
                                                           attempts=failed["recovery_failures"]))
                stats["given_up"] += 1
                continue
            if run["recovering"]:
                await conn.execute(text("UPDATE coordinator.runs SET recovery_failures = recovery_failures + 1 WHERE id = :r"),
                                   {"r": run["id"]})
            # Its users hear "Recovery started" once per stall (recovery_told, which progress
            # clears): not again for the sweep's next attempt, nor when its jobs were first
            # awaited (the waiting path) and then found lost.
            await republish_pending(conn, deps, run, "system:recovery", announce=not run["recovery_told"])
            # Shown to operators as "stuck" until it progresses (results.py clears it).
            await conn.execute(text("UPDATE coordinator.runs SET needs_attention = true, attention_reason = 'stuck' "
                                    "WHERE id = :r"), {"r": run["id"]})
            stats["recovered"] += 1
    if stats["recovered"] or stats["given_up"]:
        deps.relay.kick()
        log.info("recovery.sweep", **stats)
    return stats


class RecoverySweeper:
    """Runs the sweep every ``recovery_interval_s``, and prunes the inbox (inbox.py),
    abandoned staged files, applied requests' ids, paid refunds and finished runs past
    their retention (run_retention.py) on the first pass, then
    every ``prune_every_s``, and on every pass while it is behind."""

    def __init__(self, deps: Deps, *, prune_every_s: float = inbox.PRUNE_EVERY_S) -> None:
        self._deps = deps
        self._prune_every_s = prune_every_s
        self._pruned_at: float | None = None
        self.prune_passes = 0  # how many prunes were tried (tests wait for the first)
        self.passes = 0  # how many sweeps were tried (tests wait for more)
        self._task: asyncio.Task | None = None
        self._settling: asyncio.Task | None = None
        self._stopping = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="recovery-sweeper")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            await self._task
        if self._settling is not None:
            self._settling.cancel()
            await asyncio.gather(self._settling, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping.is_set():
            # Credits are settled beside the sweep, not before it: with billing hung, every
            # refund owed waited out its call's timeout (15 s each, up to 300 a pass), and
            # stuck runs of every tenant waited minutes for their recovery.
            if self._settling is None or self._settling.done():
                self._settling = asyncio.create_task(self._settle(), name="credit-settlement")
            try:
                await sweep(self._deps)
            except Exception as exc:  # database away: next pass
                log.warning("recovery.sweep_failed", error=repr(exc))
            self.passes += 1
            await self._prune_when_due()
            try:
                await asyncio.wait_for(self._stopping.wait(), self._deps.settings.recovery_interval_s)
            except asyncio.TimeoutError:
                pass

    async def _settle(self) -> None:
        try:
            stats = await settle_credits(self._deps)
        except Exception as exc:  # database or billing away: the next pass tries again
            log.warning("recovery.settlement_failed", error=repr(exc)[:500])
            return
        if any(stats.values()):
            log.info("recovery.settled", **stats)

    async def _prune_when_due(self) -> None:
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < self._prune_every_s:
            return
        engine, retention_s = self._deps.engine, self._deps.settings.run_retention_days * run_retention.DAY_S
        prunes = (
            ("inbox", lambda: inbox.prune(engine)),
            # Files sent ahead for a run that was never created (its request failed or was
            # abandoned between the parts and the run).
            ("staged_files", lambda: staged_files.prune(engine)),
            ("requests_applied", lambda: requests_applied.prune(engine)),
            ("refunds_due", lambda: prune_paid_refunds(engine)),
            ("runs", lambda: run_retention.prune(engine, older_than_s=retention_s)),
        )
        behind = False
        for name, prune in prunes:
            try:
                rows, left = await prune()
            except Exception as exc:  # database away: the next pass tries again
                log.warning("prune_failed", table=name, error=repr(exc)[:500])
                rows, left = 0, True
            behind = behind or left
            if rows:
                log.info("pruned", table=name, rows=rows)
        self._pruned_at = None if behind else now
        self.prune_passes += 1
