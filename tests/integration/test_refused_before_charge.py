"""Requests refused before anything is made or charged: templates and runs naming a handler
that no executor offers (shared/handler_offers.py; accepted while nothing is known), and a
run id that another tenant's run has."""

from __future__ import annotations

import asyncio

import pytest

from shared.handler_offers import HandlerOffer
from tests.stack import Stack, expect_error


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator")  # no executor yet
    yield s
    await s.stop()


async def known(stack, handler: str, timeout: float = 10.0) -> None:
    """Until the coordinator's watched copy has the handler."""
    handlers = stack.services["coordinator"][0].deps.handlers
    deadline = asyncio.get_running_loop().time() + timeout
    while handlers.unknown([handler]):
        assert asyncio.get_running_loop().time() < deadline, f"the coordinator never learnt of {handler!r}"
        await asyncio.sleep(0.02)


async def test_handlers_are_judged_by_what_executors_offer_and_not_before(stack):
    tenant = await stack.tenant(monthly=100)
    # No executor has offered anything yet: nothing to judge by, so it is accepted.
    early = await stack.template(tenant, [{"name": "read", "handler": "ocr"}])

    offer = HandlerOffer(stack.js, stack.names, ["noop", "checksum"])  # an executor starting
    await offer.start()
    try:
        await known(stack, "noop")
        error = await expect_error("validation_error", stack.template(tenant, [
            {"name": "a", "handler": "noop"}, {"name": "b", "handler": "ocr"}]))
        assert list(error.details["fields"]) == ["steps.1.handler"]
        assert "no executor offers the handler 'ocr'" in error.details["fields"]["steps.1.handler"]
        assert "noop" in error.details["fields"]["steps.1.handler"]  # what is offered
        assert await stack.template(tenant, [{"name": "a", "handler": "checksum"}])
        # A run on the early template is refused before it is charged.
        await expect_error("validation_error", stack.submit(tenant, early, 3))
        balance = await stack.call("billing", "balance", tenant_id=tenant)
        assert balance["monthly"]["remaining"] == 100
    finally:
        await offer.stop()


async def test_a_run_id_of_another_tenant_is_refused_before_any_charge(stack):
    """Over the bus (the gateway derives run ids per tenant): the charge went through, the
    insert failed, and the refund was looked up under the other run's settled charge key."""
    owner, other = await stack.tenant(monthly=10), await stack.tenant(monthly=10)
    run = await stack.submit(owner, await stack.template(owner, [{"name": "a", "handler": "noop"}]), 1)
    template = await stack.template(other, [{"name": "a", "handler": "noop"}])
    await expect_error("conflict", stack.submit(other, template, 1, run_id=run["id"]))
    assert (await stack.call("billing", "balance", tenant_id=other))["monthly"]["remaining"] == 10
