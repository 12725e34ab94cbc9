"""Pull batches from a durable consumer and hand each to a handler: the loop behind the
coordinator's results and the notifier (the executor pulls by free slots: its Worker)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.bus import client_of
from shared.jetstream import Puller

log = structlog.get_logger(__name__)

BatchHandler = Callable[[list[Msg]], Awaitable[None]]


class PullLoop:
    """Fetch batches from a durable pull consumer and hand each batch to ``handle``.

    ``handle`` acks, naks or terms each message itself (explicit ack). Stopping lets the
    batch in hand finish: stop pulling, finish in-flight, then the caller drains.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        handle: BatchHandler,
        *,
        batch: int = 256,
        fetch_timeout: float = 1.0,
        gather_s: float = 0.0,
        name: str = "pull",
    ) -> None:
        self._js = js
        self._stream = stream
        self._durable = durable
        self._handle = handle
        self._batch = batch
        self._fetch_timeout = fetch_timeout
        self._gather_s = gather_s
        self._name = name
        self._stopping = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        self._stopping.set()
        if self._task:
            await self._task

    async def _run(self) -> None:
        puller = Puller(client_of(self._js), self._stream, self._durable)
        while not self._stopping.is_set():
            try:
                msgs = await puller.fetch(self._batch, timeout=self._fetch_timeout)
            except Exception as exc:  # broker down, consumer not yet there: wait and retry
                log.warning("pull.fetch_failed", loop=self._name, error=repr(exc))
                await self._sleep(0.5)
                continue
            if not msgs:
                continue
            if self._gather_s and len(msgs) < self._batch:
                # A short batch means we keep up with the producers: wait a moment and take
                # what came meanwhile, so the per-batch cost (a transaction) is shared by more.
                await asyncio.sleep(self._gather_s)
                try:
                    msgs += await puller.fetch(self._batch - len(msgs), wait=False)
                except Exception as exc:  # handled next time round; these messages go on
                    log.warning("pull.fetch_failed", loop=self._name, error=repr(exc))
            try:
                await self._handle(msgs)
            except Exception as exc:
                # The batch's messages stay unacked and come back after the ack wait.
                log.exception("pull.batch_failed", loop=self._name, error=repr(exc))
                await self._sleep(0.5)
        await puller.stop()

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass
