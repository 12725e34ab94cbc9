"""A tenant's window: at most so many of its jobs out at once (published, not yet finished),
all its runs together, so that neither a big run nor many runs of one tenant bury another
tenant's jobs in the one FIFO consumer every executor shares. The relay asks before each
page of an expansion (jobs.expand_page); the size follows the executors' slots."""

from __future__ import annotations

import math
import time
from typing import Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

# A tenant's jobs out (published, not yet SUCCEEDED, FAILED or ERROR), estimated from below:
# the pending files of its RUNNING per_file runs (a batch run's files are one job), less
# those its expansions have not published yet (``count − published`` each; rows from
# before those were kept: the run's total and the index reached). Files an operator
# skipped or cancelled before their job went out make it an underestimate, never an
# overestimate: the window can let a few too many out, but it never waits for jobs that do
# not exist.
# Runs flagged ``breaker_open`` do not count: their jobs out wait for a dependency, deferred
# by the executors (nak'd with a delay, not at the head of the queue), and counted they held
# the window until the breaker closed, so that none of the tenant's other runs started
# (a soak test: a 10-file run waited 4 minutes). Such a run publishes no more of its jobs
# until it progresses again (expand_page), which clears the flag.
_NOT_WAITING_ON_A_BREAKER = "attention_reason IS DISTINCT FROM 'breaker_open'"
_TENANT_OUT = text(
    "SELECT (SELECT coalesce(sum(pending), 0) FROM coordinator.runs "
    "        WHERE tenant_id = :t AND status = 'RUNNING' AND mode = 'per_file' AND " + _NOT_WAITING_ON_A_BREAKER + ") "
    " - (SELECT coalesce(sum(GREATEST(coalesce((o.expand->>'count')::int, r.total) "
    "        - coalesce((o.expand->>'published')::int, (o.expand->>'after_idx')::int + 1), 0)), 0) "
    "    FROM coordinator.outbox o JOIN coordinator.runs r ON r.id = o.expand->>'run_id' "
    "    WHERE o.expand IS NOT NULL AND r.tenant_id = :t AND r.status = 'RUNNING' AND r." + _NOT_WAITING_ON_A_BREAKER + ")"
)


async def room(conn: AsyncConnection, tenant_id: str, window: int) -> int:
    """How many more of this tenant's jobs may be published now: at most ``window`` of them
    out at once, whatever runs they belong to, so that neither a big run nor many runs of
    one tenant bury another tenant's jobs under theirs in the one FIFO consumer every
    executor shares."""
    return window - (await conn.execute(_TENANT_OUT, {"t": tenant_id})).scalar_one()


# ---- the window adapts to the executors' slots -----------------------------------------------

# A tenant's window is HEADROOM × the fleet's slots shared among the tenants with work waiting:
# a slot's worth running and three queued, so that no executor starves between a result
# and the next publication (results gathered and applied, then a page published: some
# 50 ms, in which one executor runs ~350 noop jobs). 2 cost the noop bench ~20% of its
# throughput, 4 about 5% (within its noise). A tenant alone can keep every slot busy; a
# newcomer waits behind at most ~3 slots' worth of another tenant's queued jobs each.
HEADROOM = 4
# However many tenants share the slots, each has at least this many jobs out.
MIN_WINDOW = 16
# The tenants with work waiting are counted at most this often (the relay asks before each
# page of each run it expands).
ACTIVE_TENANTS_TTL_S = 0.5

# Tenants with a RUNNING per_file run that has PENDING files: an index-only scan of the
# partial index on RUNNING runs (runs_running_by_tenant: tenant_id, INCLUDE mode, pending).
_ACTIVE_TENANTS = text(
    "SELECT count(DISTINCT tenant_id) FROM coordinator.runs "
    "WHERE status = 'RUNNING' AND mode = 'per_file' AND pending > 0"
)


def window_size(cap: int, slots: int | None, active_tenants: int) -> int:
    """A tenant's window: HEADROOM × the executors' ``slots`` shared among the
    ``active_tenants``, at least MIN_WINDOW, at most ``cap`` (REDRIVE_JOBS_IN_FLIGHT_PER_TENANT);
    the cap while the slots are unknown (no executor has announced them)."""
    if slots is None:
        return cap
    return min(cap, max(MIN_WINDOW, math.ceil(HEADROOM * slots / max(1, active_tenants))))


class Window:
    """Each tenant's window now (:func:`window_size`): ``slots`` gives the slots of the
    executors alive (None: unknown; OfferedHandlers.slots)."""

    def __init__(self, cap: int, slots: Callable[[], int | None], *, clock=time.monotonic) -> None:
        self.cap, self._slots, self._clock = cap, slots, clock
        self._active: tuple[int, float] | None = None  # (count, when counted)

    async def size(self, conn: AsyncConnection) -> int:
        slots = self._slots()
        if slots is None or self.cap <= MIN_WINDOW:
            return self.cap  # whatever the tenants: no need to count them
        return window_size(self.cap, slots, await self.active_tenants(conn))

    async def active_tenants(self, conn: AsyncConnection) -> int:
        now = self._clock()
        if self._active is None or now - self._active[1] >= ACTIVE_TENANTS_TTL_S:
            self._active = ((await conn.execute(_ACTIVE_TENANTS)).scalar_one(), now)
        return self._active[0]
