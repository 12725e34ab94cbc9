"""A charge waits for billing no longer than the request's caller waits (credits.reserve)."""

from __future__ import annotations

import contextlib
import time

import pytest

from services.coordinator import credits
from shared import rpc
from shared.messages import ServiceError


class Billing:
    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    async def call(self, service, verb, payload, *, timeout=None):
        self.timeouts.append(timeout)
        return {"charged": payload["amount"], "from_monthly": payload["amount"], "from_purchased": 0}


class Conn:
    async def execute(self, *args, **kwargs):
        return None


@contextlib.asynccontextmanager
async def no_database(engine):
    yield Conn()


async def reserve(billing: Billing) -> None:
    await credits.reserve(None, billing, key="r:retry:1", run_id="r", tenant_id="t", amount=2, actor="a")


async def test_the_reserve_waits_within_the_callers_deadline(monkeypatch):
    """Waiting its own 15 s after the gateway had answered 503, a Continue held its run, and
    the client's retry under the same Idempotency-Key met a 409 kept for a day."""
    monkeypatch.setattr(credits, "transaction", no_database)
    billing = Billing()
    await reserve(billing)  # no caller deadline known: the client's own timeout
    token = rpc._caller_deadline.set(time.time() + 6.0)
    try:
        await reserve(billing)
    finally:
        rpc._caller_deadline.reset(token)
    token = rpc._caller_deadline.set(time.time() + 1.5)  # nearly gone: not charged at all
    try:
        with pytest.raises(ServiceError) as refused:
            await reserve(billing)
    finally:
        rpc._caller_deadline.reset(token)
    assert refused.value.code == "service_unavailable"
    assert len(billing.timeouts) == 2 and billing.timeouts[0] is None and 3.5 < billing.timeouts[1] <= 4.0
