"""In-progress acks for every job in flight, from one loop.

A step longer than the ack wait must not be redelivered while it is alive. One ticker for
the whole process (instead of a timer per job) keeps the fast path free of it: a job that
finishes within a tick never costs an in-progress ack at all.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from nats.aio.msg import Msg

log = structlog.get_logger(__name__)


class KeepAlive:
    def __init__(self, ack_wait_s: float) -> None:
        self.every_s = max(0.2, ack_wait_s / 3)
        self._inflight: dict[int, tuple[Msg, float]] = {}  # Msg is unhashable: keyed by id
        self._task: asyncio.Task | None = None

    def add(self, msg: Msg) -> None:
        self._inflight[id(msg)] = (msg, time.monotonic())

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
            due = time.monotonic() - self.every_s
            for msg, started in list(self._inflight.values()):
                if started <= due:
                    try:
                        await msg.in_progress()
                    except Exception as exc:  # NATS away: the ack wait decides
                        log.debug("keepalive.failed", error=repr(exc))
