"""Executors' heartbeats (``<prefix>.runs.alive``): a run with a job in flight is quiet,
not stuck. Each heartbeat moves the run's ``quiet_until`` to now; the recovery sweep
leaves a run alone until a lease has passed since then (recovery.py).

Best effort on both sides: a lost heartbeat is followed by the next one (every ack wait
/ 3), and only a whole lease without any makes the run a candidate for recovery.
"""

from __future__ import annotations

import orjson
import structlog
from nats.aio.msg import Msg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import transaction

log = structlog.get_logger(__name__)

MAX_RUN_IDS = 1000

# Rows locked in id order, as every other writer of runs does (no deadlock with results).
_ALIVE = text(
    "UPDATE coordinator.runs r SET quiet_until = GREATEST(r.quiet_until, now()) FROM ("
    " SELECT id FROM coordinator.runs WHERE id = ANY(CAST(:ids AS text[])) AND status = 'RUNNING' "
    " ORDER BY id FOR UPDATE) s WHERE r.id = s.id"
)


def run_ids_of(data: bytes) -> list[str] | None:
    """The run ids a heartbeat names, or None when it is not one of ours."""
    try:
        ids = orjson.loads(data).get("run_ids")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(ids, list) or len(ids) > MAX_RUN_IDS:
        return None
    if not all(isinstance(i, str) and 0 < len(i) <= 100 and "\x00" not in i for i in ids):
        return None
    return ids


def make_alive_handler(engine: AsyncEngine):
    async def handle(msg: Msg) -> None:
        ids = run_ids_of(msg.data)
        if ids is None:
            log.warning("alive.unreadable", size=len(msg.data))
            return
        if not ids:
            return
        try:
            async with transaction(engine) as conn:
                await conn.execute(_ALIVE, {"ids": sorted(set(ids))})
        except Exception as exc:  # database away: the next heartbeat tells again
            log.warning("alive.not_recorded", runs=len(ids), error=repr(exc)[:300])

    return handle
