"""Composition root of the notifier: settings in, a service with start and stop out.
Nothing connects at import time or in :func:`build`; everything connects in ``start``."""

from __future__ import annotations

from functools import partial

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import bus, streams
from shared.pull_loop import PullLoop
from shared.db import make_engine
from shared.rpc import MicroService
from shared.runtime import run
from shared.settings import Settings
from shared.subjects import Names
from services.notifier.consumer import make_handler
from services.notifier.live import announcer
from services.notifier.destinations import Destinations
from services.notifier.handlers import VERBS, put_webhook
from services.notifier.retention import RetentionSweeper
from services.notifier.schemas import PutWebhook
from services.notifier.webhooks import WebhookSender

FETCH_BATCH = 500


def bind_verbs(engine: AsyncEngine, destinations: Destinations = Destinations(), on_queued=lambda: None) -> dict:
    """Each verb as ``async (payload: dict) -> data``: validate the request, then handle it.
    ``on_queued`` is told when deliveries were queued again (the sender looks at once)."""
    def bind(model: type[BaseModel], fn):
        async def verb(payload: dict):
            return await fn(engine, model.model_validate(payload))
        return verb

    verbs = dict(VERBS)
    verbs["put_webhook"] = (PutWebhook, partial(put_webhook, destinations=destinations))
    for name in ("redeliver", "redeliver_failed"):
        model, fn = verbs[name]
        verbs[name] = (model, partial(fn, on_queued=on_queued))
    return {name: bind(model, fn) for name, (model, fn) in verbs.items()}


class NotifierService:
    def __init__(self, settings: Settings, *, webhook_base_ms: int = 1000) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.webhook_base_ms = webhook_base_ms
        self.nc = self.engine = self.sender = self.loop = self.micro = self.retention = None
        self.handle = None

    async def start(self) -> None:
        s, names = self.settings, self.names
        self.engine = make_engine(s, pool_size=5, application_name="redrive-notifier")
        self.nc = await bus.connect(s, "redrive-notifier")
        js = self.nc.jetstream()
        await streams.ensure_streams(js, s)
        # Only the events that notify (on NATS 2.9, every event: the handler sorts them by subject).
        # Declared at start, and again by the loop should it be deleted (shared/pull_loop.py).
        ensure_consumer = partial(streams.ensure_consumer, js, names.events_stream, names.notifier_consumer,
                                  names.notifier_filters, wide_filter=names.events_all, ack_wait_s=30)
        await ensure_consumer()
        destinations = Destinations(allow_private=s.webhook_allow_private)
        self.sender = WebhookSender(self.engine, timeout_s=s.webhook_timeout_s, max_attempts=s.webhook_max_attempts,
                                    base_ms=self.webhook_base_ms, destinations=destinations)
        self.handle = make_handler(self.engine, names, self.sender.kick, announce=announcer(self.nc, names))
        self.loop = PullLoop(js, names.events_stream, names.notifier_consumer, self.handle, batch=FETCH_BATCH,
                                 name="notifier", ensure=ensure_consumer)
        self.micro = MicroService(self.nc, names, "notifier", bind_verbs(self.engine, destinations, self.sender.kick),
                                 "redrive notifications and webhooks")
        self.retention = RetentionSweeper(self.engine, notification_days=s.notification_retention_days,
                                          delivery_days=s.webhook_delivery_retention_days)
        await self.micro.start()
        self.sender.start()
        self.loop.start()
        self.retention.start()

    async def stop(self) -> None:
        """Stop pulling (the batch in hand finishes), stop posting, stop answering, then
        flush and close NATS and the pool."""
        if self.loop is not None:
            await self.loop.stop()
        if self.sender is not None:
            await self.sender.stop()
        if self.retention is not None:
            await self.retention.stop()
        if self.micro is not None:
            await self.micro.stop()
        if self.nc is not None:
            await bus.close(self.nc)
        if self.engine is not None:
            await self.engine.dispose()


async def build(settings: Settings) -> NotifierService:
    return NotifierService(settings)


def main(settings: Settings) -> None:
    run("notifier", build, settings)
