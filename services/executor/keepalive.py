"""In-progress acks for every job in flight, from one loop, and heartbeats for their runs.

A step longer than the ack wait must not be redelivered while it is alive. One ticker for
the whole process (instead of a timer per job) keeps the fast path free of it: a job that
finishes within a tick never costs an in-progress ack at all.

The same tick tells the coordinator which runs have such a job in flight (``runs.alive``),
because a run whose only file is in a long step makes no progress the coordinator can
see: without it the recovery sweep would take the run for stuck after its lease, and
publish a second copy of a job that is running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import orjson
import structlog
from nats.aio.msg import Msg

log = structlog.get_logger(__name__)

# Run ids per heartbeat message: well under any max payload.
ALIVE_BATCH = 500

Publish = Callable[[bytes], Awaitable[None]]


class KeepAlive:
    def __init__(self, ack_wait_s: float, publish_alive: Publish | None = None) -> None:
        self.every_s = max(0.2, ack_wait_s / 3)
        self._publish_alive = publish_alive
        self._inflight: dict[int, tuple[Msg, float, str]] = {}  # Msg is unhashable: keyed by id
        self._task: asyncio.Task | None = None

    def add(self, msg: Msg, run_id: str) -> None:
        self._inflight[id(msg)] = (msg, time.monotonic(), run_id)

    def remove(self, msg: Msg) -> None:
        self._inflight.pop(id(msg), None)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="keepalive")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            await self.tick()

    async def tick(self) -> None:
        due = time.monotonic() - self.every_s
        alive: set[str] = set()
        for msg, started, run_id in list(self._inflight.values()):
            if started <= due:
                alive.add(run_id)
                try:
                    await msg.in_progress()
                except Exception as exc:  # NATS away: the ack wait decides
                    log.debug("keepalive.failed", error=repr(exc))
        if alive and self._publish_alive is not None:
            runs = sorted(alive)
            for i in range(0, len(runs), ALIVE_BATCH):
                try:
                    await self._publish_alive(orjson.dumps({"v": 1, "run_ids": runs[i:i + ALIVE_BATCH]}))
                except Exception as exc:  # the next tick tells again
                    log.debug("keepalive.alive_failed", error=repr(exc))
