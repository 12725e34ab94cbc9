"""Pull jobs from the shared ``executor`` consumer and run up to ``concurrency`` at once.

Fetches are sized by free slots, so a slow job never holds messages it cannot start (they
would sit unacked until the ack wait and be redelivered elsewhere for nothing). Stopping
stops pulling, lets in-flight jobs finish (bounded by the grace period), then returns.
"""

from __future__ import annotations

import asyncio

import nats
import structlog
from nats.js import JetStreamContext

from shared.subjects import Names
from services.executor.job_runner import JobRunner

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, js: JetStreamContext, names: Names, runner: JobRunner, *, concurrency: int, fetch_batch: int) -> None:
        self._js = js
        self._names = names
        self._runner = runner
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrency = concurrency
        self._fetch_batch = fetch_batch
        self._inflight: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.completed = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="executor-pull")

    async def stop(self, grace_s: float = 30.0) -> None:
        self._stopping.set()
        if self._task:
            await self._task
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=grace_s)

    async def _run(self) -> None:
        sub = None
        while not self._stopping.is_set():
            free = self._concurrency - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                if sub is None:
                    sub = await self._js.pull_subscribe_bind(self._names.executor_consumer, self._names.jobs_stream)
                msgs = await sub.fetch(min(free, self._fetch_batch), timeout=1.0)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                continue
            except Exception as exc:
                log.warning("executor.fetch_failed", error=repr(exc))
                sub = None
                await asyncio.sleep(0.5)
                continue
            for msg in msgs:
                task = asyncio.create_task(self._one(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _one(self, msg) -> None:
        try:
            await self._runner.handle(msg)
            self.completed += 1
        except Exception as exc:
            # Publishing or acking failed (NATS away): leave the message unacked; it comes
            # back after the ack wait and the coordinator dedupes whatever was published.
            log.warning("executor.job_failed", subject=msg.subject, error=repr(exc))
