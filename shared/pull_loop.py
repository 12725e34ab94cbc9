"""Pull batches from a durable consumer and hand each to a handler: the loop behind the
coordinator's results and the notifier (the executor pulls by free slots: its Worker).
Both loops keep their consumer with a :class:`ConsumerKeeper`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from shared.bus import client_of
from shared.jetstream import Puller, PullError

log = structlog.get_logger(__name__)

BatchHandler = Callable[[list[Msg]], Awaitable[None]]
# Declares a loop's durable consumer: the very ``streams.ensure_consumer`` call its service
# made at start, so a consumer declared again has the config it was made with.
EnsureConsumer = Callable[[], Awaitable[None]]

# How often a loop may ask whether its consumer is gone: after a refused fetch, or once it
# was found missing (likely, and the server answers at once), and while fetches come back
# empty (the only sign on NATS 2.9, but mostly just a quiet system: seldom).
CHECK_AFTER_REFUSAL_S = 1.0
CHECK_WHILE_EMPTY_S = 5.0
_CHECK_TIMEOUT_S = 2.0


class ConsumerKeeper:
    """Declares a loop's durable consumer again when it is deleted while the loop runs (an
    operator's `nats consumer rm`, a stream tool, a mistake): services declare consumers
    only at start, and a loop pulling from a missing one gets nothing for ever.

    How a missing consumer shows depends on the server. A pull request open when it is
    deleted ends with "409 Consumer Deleted" (2.9 and 2.15); later requests are refused
    with "503" (no responders) on 2.15, and on 2.9 get no answer at all: the fetch just
    comes back empty. So the loop tells the keeper of refused and of empty fetches, and
    the keeper (rate-limited) asks the server whether the consumer exists: only when it
    does not is it declared, so a live consumer's config (another process's) is never
    re-applied for nothing.

    It is declared only when found missing twice, a check apart: the 409 comes while the
    server is still deleting it, and a consumer made at once races the removal of its
    directory (NATS 2.9 then fails the operator's delete: "unlinkat … directory not empty").
    """

    def __init__(self, js: JetStreamContext, stream: str, durable: str, ensure: EnsureConsumer | None, *,
                 name: str) -> None:
        self._js = js
        self._stream = stream
        self._durable = durable
        self._ensure = ensure
        self._name = name
        self._checked_at = float("-inf")
        self._missing = False  # found missing at the last check

    async def after_fetch_failed(self, exc: BaseException) -> None:
        # A PullError is the server's refusal (409 Consumer Deleted, 503). Anything else
        # (NATS away, a timeout) says nothing about the consumer, and asking would only wait.
        if isinstance(exc, PullError):
            await self._check(CHECK_AFTER_REFUSAL_S)

    async def after_empty_fetch(self) -> None:
        await self._check(CHECK_WHILE_EMPTY_S)

    async def _check(self, every_s: float) -> None:
        if self._ensure is None or not client_of(self._js).is_connected:
            return
        if self._missing:
            every_s = CHECK_AFTER_REFUSAL_S
        now = asyncio.get_running_loop().time()
        if now - self._checked_at < every_s:
            return
        self._checked_at = now
        try:
            await self._js.consumer_info(self._stream, self._durable, timeout=_CHECK_TIMEOUT_S)
            self._missing = False  # there: the refusal or the quiet has another cause
            return
        except NotFoundError:
            pass
        except Exception as exc:  # NATS slow or away: ask again after the next fetch
            log.warning("pull.consumer_check_failed", loop=self._name, consumer=self._durable, error=repr(exc))
            return
        if not self._missing:  # maybe still being deleted: declared at the next check
            self._missing = True
            return
        try:
            await self._ensure()
        except Exception as exc:  # its stream gone too, say: tried again at the next check
            log.warning("pull.consumer_redeclare_failed", loop=self._name, stream=self._stream,
                        consumer=self._durable, error=repr(exc))
            return
        self._missing = False
        log.warning("pull.consumer_redeclared", loop=self._name, stream=self._stream, consumer=self._durable)


class PullLoop:
    """Fetch batches from a durable pull consumer and hand each batch to ``handle``.

    ``handle`` acks, naks or terms each message itself (explicit ack). Stopping lets the
    batch in hand finish: stop pulling, finish in-flight, then the caller drains.
    ``ensure`` declares the consumer again should it be deleted (:class:`ConsumerKeeper`).
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
        ensure: EnsureConsumer | None = None,
    ) -> None:
        self._js = js
        self._stream = stream
        self._durable = durable
        self._handle = handle
        self._batch = batch
        self._fetch_timeout = fetch_timeout
        self._gather_s = gather_s
        self._name = name
        self._keeper = ConsumerKeeper(js, stream, durable, ensure, name=name)
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
            except Exception as exc:  # broker down, consumer not yet there or deleted: wait and retry
                log.warning("pull.fetch_failed", loop=self._name, error=repr(exc))
                await self._keeper.after_fetch_failed(exc)
                await self._sleep(0.5)
                continue
            if not msgs:
                await self._keeper.after_empty_fetch()
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
