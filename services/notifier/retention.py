"""How long the notifier keeps what it has said, and forgetting it after.

Every run outcome leaves a notification, and for a tenant with a webhook a delivery that
carries the whole body. Kept forever, both tables grow without bound. So:

* a notification older than ``notification_retention_days`` (default 90) goes;
* a delivery that ended (delivered, or failed for good) more than
  ``webhook_delivery_retention_days`` (default 30) ago goes. A pending delivery is never
  touched, however old: it is still owed.

A delivery outlives nothing it needs: it carries its own body, so it can be sent again
after its notification is gone.

Rows go a batch at a time, found through BRIN indexes (migration n0003), so a prune never
holds a long transaction. One pass is bounded; a pass that leaves rows behind comes back
sooner.
"""

from __future__ import annotations

import asyncio

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import delete_in_batches

log = structlog.get_logger(__name__)

DAY_S = 86_400.0
PRUNE_EVERY_S = 3600.0
BEHIND_RETRY_S = 1.0

_PRUNE_NOTIFICATIONS = text(
    "DELETE FROM notifier.notifications WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM notifier.notifications WHERE at < now() - make_interval(secs => :age) LIMIT :batch))"
)
_PRUNE_DELIVERIES = text(
    "DELETE FROM notifier.deliveries WHERE ctid = ANY(ARRAY("
    " SELECT ctid FROM notifier.deliveries WHERE status <> 'pending' "
    " AND coalesce(delivered_at, next_attempt_at) < now() - make_interval(secs => :age) LIMIT :batch))"
)


async def prune(engine: AsyncEngine, *, notifications_older_than_s: float, deliveries_older_than_s: float,
                batch: int = 5_000, max_batches: int = 10) -> tuple[dict[str, int], bool]:
    """Forget what is past its retention: ({table: rows}, whether some are left). Each
    table stops after ``max_batches``, so one pass is short however far behind it is."""
    pruned: dict[str, int] = {}
    behind = False
    for table, statement, age in (("notifications", _PRUNE_NOTIFICATIONS, notifications_older_than_s),
                                  ("deliveries", _PRUNE_DELIVERIES, deliveries_older_than_s)):
        pruned[table], left = await delete_in_batches(engine, statement, {"age": float(age)}, batch=batch,
                                                      max_batches=max_batches)
        behind = behind or left
    return pruned, behind


class RetentionSweeper:
    """Prunes at start, then every ``every_s``; again after a second while it is behind."""

    def __init__(self, engine: AsyncEngine, *, notification_days: float, delivery_days: float,
                 every_s: float = PRUNE_EVERY_S) -> None:
        self._engine = engine
        self._ages = {"notifications_older_than_s": notification_days * DAY_S,
                      "deliveries_older_than_s": delivery_days * DAY_S}
        self._every_s = every_s
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.passes = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="notifier-retention")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stopping.is_set():
            wait_s = self._every_s
            try:
                pruned, behind = await prune(self._engine, **self._ages)
                if any(pruned.values()):
                    log.info("retention.pruned", **pruned)
                if behind:
                    wait_s = BEHIND_RETRY_S
            except Exception as exc:  # database away: the next pass tries again
                log.warning("retention.prune_failed", error=repr(exc)[:500])
            self.passes += 1
            try:
                await asyncio.wait_for(self._stopping.wait(), wait_s)
            except asyncio.TimeoutError:
                pass
