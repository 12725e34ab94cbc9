"""How long the inbox remembers an applied file event's message id, and forgetting it after.

The inbox (``coordinator.inbox``) gets one row per file event, the highest-volume table
of the system; kept forever it grows without bound and every insert on the hot path pays
for a deeper index. An event can be delivered again only while the events stream holds it
(limits retention, ``EVENTS_MAX_AGE_S``), so an id older than that, plus a day of margin,
is never asked about again. Even if a copy did arrive later (an executor re-running a job
for days), the file rules still hold: a file's first terminal result wins and checkpoints
only move forward.

Rows go a batch at a time (found through a BRIN index on ``received_at``, which costs the
hot path next to nothing), so a prune never holds a long transaction.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.streams import EVENTS_MAX_AGE_S
from shared.db import delete_in_batches

RETENTION_S = EVENTS_MAX_AGE_S + 24 * 3600
PRUNE_EVERY_S = 3600.0

_PRUNE = text(
    "DELETE FROM coordinator.inbox WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM coordinator.inbox WHERE received_at < now() - make_interval(secs => :age) LIMIT :batch))"
)


async def prune(engine: AsyncEngine, *, older_than_s: float = RETENTION_S, batch: int = 10_000,
                max_batches: int = 10) -> tuple[int, bool]:
    """Forget ids older than ``older_than_s``: (how many, whether some are left). Stops
    after ``max_batches``, so one pass is short however far behind it is; the caller
    comes back sooner while some are left."""
    return await delete_in_batches(engine, _PRUNE, {"age": float(older_than_s)}, batch=batch, max_batches=max_batches)
