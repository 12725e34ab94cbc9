"""Billing chores the CLI runs directly against the database (no NATS needed)."""

from __future__ import annotations

from shared.db import make_engine
from shared.settings import Settings
from services.billing import handlers
from services.billing.schemas import OpenAccount


async def open_account_direct(settings: Settings, tenant_id: str, monthly: int, purchased: int) -> dict:
    engine = make_engine(settings, pool_size=1)
    try:
        return await handlers.open_account(engine, OpenAccount(tenant_id=tenant_id, monthly_allowance=monthly, purchased=purchased))
    finally:
        await engine.dispose()
