"""How long a finished run is kept, and forgetting it after.

A run keeps a row per file (about 1.2 KB each with its timeline, measured by the soak
test), and kept forever they only grow. So a run that finished more than
``run_retention_days`` ago (default 90) is deleted, with its files, its timeline, its
credit intents and its refunds; its id is a 404 from then on, and it can no longer be
continued. A run that finished and was resumed (Continue, retry, a file action) counts
from when it last finished: resuming clears ``finished_at``.

What it never touches:

* a run that has not finished (RUNNING, however old or stuck: recovery and operators
  own it);
* a finished run that is still owed a refund, or whose credit reservation is still
  pending: the sweep settles those first (credits.py, commands/cancel.py), and the run
  goes on a later pass;
* billing's ledger: what was charged and refunded is billing's record, kept by billing.

A finished run flagged for attention (recovery failed) goes too, once past its retention:
its notification went at the same age (services/notifier/retention.py).

Runs go a few at a time, oldest first, one transaction each, bounded by their files, so
a prune never holds a long transaction; a 100,000-file run goes alone. Each candidate is
locked with SKIP LOCKED, so a Continue racing the prune either resumes the run first
(then it is no longer finished, and stays) or finds it gone (404).
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import transaction

DAY_S = 86_400.0

_FINISHED = ("finished_at < now() - make_interval(secs => :age) "
             "AND status IN ('COMPLETED', 'COMPLETED_WITH_ERRORS', 'FAILED', 'CANCELLED')")
# NOT IN over the small sets of unsettled rows (partial indexes refunds_due_unpaid and
# credit_intents_pending); run_id is NOT NULL, so NOT IN means what it says.
_EXPIRED = text(
    f"SELECT id, total FROM coordinator.runs WHERE {_FINISHED} "
    " AND id NOT IN (SELECT run_id FROM coordinator.refunds_due WHERE NOT paid) "
    " AND id NOT IN (SELECT run_id FROM coordinator.credit_intents WHERE state = 'pending') "
    "ORDER BY finished_at, id LIMIT :runs FOR UPDATE SKIP LOCKED"
)
_DELETES = tuple(text(f"DELETE FROM coordinator.{table} WHERE {column} = ANY(CAST(:ids AS text[]))") for table, column in (
    ("files", "run_id"), ("timeline", "run_id"), ("credit_intents", "run_id"), ("refunds_due", "run_id"),
    ("runs", "id")))


def _within_budget(expired: list, max_files: int) -> list[str]:
    """The oldest runs whose files together stay within ``max_files``, and always the
    first, however large, so that a big run is not skipped for ever."""
    taken, files = [], 0
    for run_id, total in expired:
        if taken and files + total > max_files:
            break
        taken.append(run_id)
        files += total
    return taken


async def prune(engine: AsyncEngine, *, older_than_s: float, runs_per_batch: int = 100,
                files_per_batch: int = 20_000, max_batches: int = 10) -> tuple[int, bool]:
    """Delete finished runs older than ``older_than_s``: (how many runs, whether some are
    left after ``max_batches``)."""
    deleted = 0
    for _ in range(max_batches):
        async with transaction(engine) as conn:
            expired = (await conn.execute(_EXPIRED, {"age": float(older_than_s), "runs": runs_per_batch})).all()
            ids = _within_budget(expired, files_per_batch)
            for statement in _DELETES:
                if ids:
                    await conn.execute(statement, {"ids": ids})
        deleted += len(ids)
        if len(ids) == len(expired) and len(expired) < runs_per_batch:
            return deleted, False
    return deleted, True
