"""Cancel a run: PENDING files become CANCELLED and the credits they were charged and never
used are refunded. The refund is owed in the same transaction (refunds_due) and paid
after commit, so neither a crash nor billing being down loses it; a cancel answers within
``REFUND_WAIT_S`` of its commit, and the sweep pays what billing was too slow to take.

A paid refund is kept ``PAID_REFUNDS_RETENTION_S``, then pruned: nothing reads it again.
Paying is idempotent in billing's ledger (the refund's key, kept there for good), and a
refund key (``<charge key>:cancel``) is owed at most once: only a cancel owes one, and a
CANCELLED run is never cancelled, resumed or charged again. The run keeps the sum refunded
(``credits_refunded``) and its timeline each refund.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import delete_in_batches, transaction
from shared.messages import ServiceError
from services.coordinator import credits, outbox, requests_applied, store, timeline
from services.coordinator.context import Deps
from services.coordinator.run_events import run_event_row
from services.coordinator.run_stops import stop_row
from services.coordinator.schemas import CancelRun

log = structlog.get_logger(__name__)

PAID_REFUNDS_RETENTION_S = 30 * 24 * 3600.0
# How long a cancel waits for billing to take its refund before answering anyway.
REFUND_WAIT_S = 2.0

# Those paid before paid_at existed (c0012) go by when they were owed. ``created_at``, never
# later than the payment, is what the BRIN index finds old rows by.
_PRUNE_PAID = text(
    "DELETE FROM coordinator.refunds_due WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM coordinator.refunds_due WHERE paid AND created_at < now() - make_interval(secs => :age) "
    " AND coalesce(paid_at, created_at) < now() - make_interval(secs => :age) LIMIT :batch))"
)


async def cancel(deps: Deps, cmd: CancelRun) -> dict:
    async with transaction(deps.engine) as conn:
        run = await store.load_run(conn, cmd.tenant_id, cmd.run_id, lock=True)
        if await requests_applied.applied(conn, cmd.tenant_id, cmd.request_id):
            return await store.run_body(conn, run)  # this very cancel was applied (its answer was lost)
        if run["status"] in ("COMPLETED", "CANCELLED"):
            raise ServiceError("conflict", f"a {run['status']} run cannot be cancelled")
        if run["pending"] == 0:
            # Finished (COMPLETED_WITH_ERRORS), or FAILED with nothing left to run: nothing to
            # stop or refund, and cancelled, its FAILED files could never be continued (its
            # users were told it finished, then that it was cancelled).
            raise ServiceError("conflict", f"a {run['status']} run with no PENDING file has nothing to cancel; "
                                           "Continue retries its FAILED files")
        was_recovering = run["recovering"] or run["recovery_noticed"] or run["recovery_told"]
        cancelled = (await conn.execute(text(
            "UPDATE coordinator.files SET status = 'CANCELLED', updated_at = now() "
            "WHERE run_id = :r AND status = 'PENDING' RETURNING idx, charge_key"), {"r": run["id"]})).all()
        per_key = Counter(key for _, key in cancelled if key)
        template = await store.load_template(conn, run["tenant_id"], run["template_id"], include_archived=True)
        owed = [
            {"key": f"{key}:cancel", "of_key": key, "run_id": run["id"], "tenant_id": run["tenant_id"],
             "amount": n * template["credits_per_file"]}
            for key, n in sorted(per_key.items()) if n * template["credits_per_file"] > 0
        ]
        if owed:
            await conn.execute(text(
                "INSERT INTO coordinator.refunds_due (key, of_key, run_id, tenant_id, amount) "
                "VALUES (:key, :of_key, :run_id, :tenant_id, :amount) ON CONFLICT DO NOTHING"), owed)
        run = dict((await conn.execute(text(
            "UPDATE coordinator.runs SET status = 'CANCELLED', pending = 0, cancelled = cancelled + :n, "
            " fanin_round = round, finished_at = now(), updated_at = now(), needs_attention = false, "
            " attention_reason = NULL, recovering = false, recovery_noticed = false, recovery_told = false, generation = generation + 1 WHERE id = :r RETURNING *"),
            {"r": run["id"], "n": len(cancelled)})).mappings().one())
        events = [run_event_row(deps.names, run, "cancelled"), stop_row(deps.names, run)]
        if was_recovering:  # users told "Recovery started" hear how it ended
            events.append(run_event_row(deps.names, run, "recovery_failed", "the run was cancelled during its recovery",
                                        unique=f"g{run['generation']}cancel"))
        await outbox.add(conn, events)
        await requests_applied.record(conn, cmd.tenant_id, cmd.request_id, run["id"])
        await timeline.append(conn, timeline.entry(run["id"], run["tenant_id"], "run_cancelled", cmd.actor,
                                                   files_cancelled=len(cancelled),
                                                   refund_owed=sum(o["amount"] for o in owed)))
    deps.relay.kick()
    # Committed: the answer must reach the caller, whatever billing does. A refund billing is
    # slow to take is left to the sweep (it is owed above; paying is idempotent per key).
    try:
        await asyncio.wait_for(pay_refunds_due(deps, run_id=run["id"]), timeout=REFUND_WAIT_S)
    except TimeoutError:
        log.warning("cancel.refund_left_to_sweep", run_id=run["id"])
    async with deps.engine.connect() as conn:
        run = await store.load_run(conn, cmd.tenant_id, cmd.run_id)
        return await store.run_body(conn, run)


async def pay_refunds_due(deps: Deps, run_id: str | None = None) -> int:
    """Pay owed refunds (idempotent per key); the recovery sweep calls it for leftovers."""
    sql = "SELECT key, of_key, run_id, tenant_id, amount FROM coordinator.refunds_due WHERE NOT paid"
    params = {}
    if run_id:
        sql += " AND run_id = :r"
        params["r"] = run_id
    async with deps.engine.connect() as conn:
        rows = (await conn.execute(text(sql + " ORDER BY created_at LIMIT 200"), params)).mappings().all()
    paid = 0
    for row in rows:
        try:
            reply = await credits.refund(deps.billing, tenant_id=row["tenant_id"], run_id=row["run_id"], key=row["key"],
                                         of_key=row["of_key"], amount=row["amount"], actor="system:cancel")
        except ServiceError as exc:
            log.warning("refund.failed", key=row["key"], error=exc.message)
            continue
        async with transaction(deps.engine) as conn:
            done = await conn.execute(text("UPDATE coordinator.refunds_due SET paid = true, paid_at = now() "
                                           "WHERE key = :k AND NOT paid"),
                                      {"k": row["key"]})
            if done.rowcount == 1:
                await conn.execute(text("UPDATE coordinator.runs SET credits_refunded = credits_refunded + :n WHERE id = :r"),
                                   {"n": reply["refunded"], "r": row["run_id"]})
                await timeline.append(conn, timeline.entry(row["run_id"], row["tenant_id"], "refund", "system:cancel",
                                                           amount=reply["refunded"], to_monthly=reply.get("to_monthly"),
                                                           to_purchased=reply.get("to_purchased"), key=row["key"]))
                paid += 1
    return paid


async def prune_paid_refunds(engine: AsyncEngine, *, older_than_s: float = PAID_REFUNDS_RETENTION_S,
                             batch: int = 10_000, max_batches: int = 10) -> tuple[int, bool]:
    """Forget refunds paid more than ``older_than_s`` ago: (how many, whether some are left).
    Unpaid ones stay, however old, until paid."""
    return await delete_in_batches(engine, _PRUNE_PAID, {"age": float(older_than_s)}, batch=batch,
                                   max_batches=max_batches)
