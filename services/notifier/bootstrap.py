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
        await bus.ensure_consumer(js, names.events_stream, names.notifier_consumer, names.events_all, ack_wait_s=30)
        self.engine = make_engine(s, pool_size=5, application_name="redrive-notifier")
        self.sender = WebhookSender(self.engine, timeout_s=s.webhook_timeout_s, max_attempts=s.webhook_max_attempts,
                                    base_ms=self.webhook_base_ms)
        self.loop = bus.PullLoop(js, names.events_stream, names.notifier_consumer,
                                 make_handler(self.engine, names, self.sender.kick), batch=1000, name="notifier")

        def bind(model, fn):
            async def verb(payload: dict):
                return await fn(self.engine, model.model_validate(payload))
            return verb

        self.micro = MicroService(self.nc, names, "notifier", {n: bind(m, f) for n, (m, f) in VERBS.items()}, "notifications")
        await self.micro.start()
        self.sender.start()
        self.loop.start()

    async def stop(self) -> None:
        await self.micro.stop()
        await self.loop.stop()
        await self.sender.stop()
        await bus.close(self.nc)
        await self.engine.dispose()


async def build(settings: Settings) -> NotifierService:
    return NotifierService(settings)


def main(settings: Settings) -> None:
    run("notifier", build, settings)
