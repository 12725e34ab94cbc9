"""Composition root of the billing service."""

from __future__ import annotations

from shared import bus
from shared.db import make_engine
from shared.rpc import MicroService
from shared.runtime import run
from shared.settings import Settings
from shared.subjects import Names
from services.billing import handlers
from services.billing.schemas import Balance, Grant, Ledger, OpenAccount, Refund, Reserve

VERBS = {"open_account": (OpenAccount, handlers.open_account), "reserve": (Reserve, handlers.reserve),
         "refund": (Refund, handlers.refund), "balance": (Balance, handlers.balance),
         "ledger": (Ledger, handlers.ledger), "grant": (Grant, handlers.grant)}


class BillingService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def start(self) -> None:
        self.nc = await bus.connect(self.settings, "billing")
        self.engine = make_engine(self.settings, pool_size=10, application_name="redrive-billing")

        def bind(model, fn):
            async def verb(payload: dict):
                return await fn(self.engine, model.model_validate(payload))
            return verb

        self.micro = MicroService(self.nc, Names(self.settings.prefix), "billing",
                                  {name: bind(m, f) for name, (m, f) in VERBS.items()}, "credit ledger")
        await self.micro.start()

    async def stop(self) -> None:
        await self.micro.stop()
        await bus.close(self.nc)
        await self.engine.dispose()


async def build(settings: Settings) -> BillingService:
    return BillingService(settings)


def main(settings: Settings) -> None:
    run("billing", build, settings)
