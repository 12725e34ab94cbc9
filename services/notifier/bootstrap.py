"""Composition root of the notifier."""

from __future__ import annotations

from shared import bus
from shared.db import make_engine
from shared.rpc import MicroService
from shared.runtime import run
from shared.settings import Settings
from shared.subjects import Names
from services.notifier import handlers
from services.notifier.consumer import make_handler
from services.notifier.webhooks import WebhookSender

VERBS = {"list": (handlers.ListCmd, handlers.list_notifications), "mark_read": (handlers.MarkRead, handlers.mark_read),
         "put_webhook": (handlers.PutWebhook, handlers.put_webhook), "get_webhook": (handlers._Cmd, handlers.get_webhook)}


class NotifierService:
    def __init__(self, settings: Settings, webhook_base_ms: int = 1000) -> None:
        self.settings = settings
        self.webhook_base_ms = webhook_base_ms

    async def start(self) -> None:
        s, names = self.settings, Names(self.settings.prefix)
        self.nc = await bus.connect(s, "notifier")
        js = self.nc.jetstream()
        await bus.ensure_streams(js, s)
        # Two filtered consumers rather than one on every event (messaging.md's table): the
        # notifier needs run events and failed files, not the succeeded file per file of a
        # 10,000-file run. (NATS 2.9 has no multi-subject filter.)
        await bus.ensure_consumer(js, names.events_stream, names.notifier_consumer, names.run_events_all, ack_wait_s=30)
        await bus.ensure_consumer(js, names.events_stream, names.notifier_failures_consumer, names.file_event("failed"),
                                  ack_wait_s=30)
        self.engine = make_engine(s, pool_size=5, application_name="redrive-notifier")
        self.sender = WebhookSender(self.engine, timeout_s=s.webhook_timeout_s, max_attempts=s.webhook_max_attempts,
                                    base_ms=self.webhook_base_ms)
        handle = make_handler(self.engine, names, self.sender.kick)
        self.loops = [bus.PullLoop(js, names.events_stream, consumer, handle, batch=500, name=consumer)
                      for consumer in (names.notifier_consumer, names.notifier_failures_consumer)]

        def bind(model, fn):
            async def verb(payload: dict):
                return await fn(self.engine, model.model_validate(payload))
            return verb

        self.micro = MicroService(self.nc, names, "notifier", {n: bind(m, f) for n, (m, f) in VERBS.items()}, "notifications")
        await self.micro.start()
        self.sender.start()
        for loop in self.loops:
            loop.start()

    async def stop(self) -> None:
        await self.micro.stop()
        for loop in self.loops:
            await loop.stop()
        await self.sender.stop()
        await bus.close(self.nc)
        await self.engine.dispose()


async def build(settings: Settings) -> NotifierService:
    return NotifierService(settings)


def main(settings: Settings) -> None:
    run("notifier", build, settings)
