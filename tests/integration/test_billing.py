"""The credit ledger over real NATS and PostgreSQL: money is protected by unique keys and
row locks, and sum(ledger) always equals the balance."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.stack import Stack, expect_error


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing")
    yield s
    await s.stop()


async def reserve(stack, tenant, amount, key):
    return await stack.call("billing", "reserve", tenant_id=tenant, amount=amount, idempotency_key=key, run_id="r")


async def test_monthly_credits_are_spent_first_and_a_shortfall_changes_nothing(stack):
    tenant = await stack.tenant(monthly=5, purchased=10)
    assert await reserve(stack, tenant, 7, "k1") == {"charged": 7, "from_monthly": 5, "from_purchased": 2, "duplicate": False}
    err = await expect_error("insufficient_credits", reserve(stack, tenant, 9, "k2"))
    assert err.details == {"needed": 9, "available": 8}
    assert [e["idempotency_key"] for e in await stack.ledger(tenant) if e["kind"] == "charge"] == ["k1"]
    await stack.assert_books_balance(tenant)


async def test_the_same_key_charges_once_even_when_twenty_requests_race(stack):
    tenant = await stack.tenant(monthly=100)
    results = await asyncio.gather(*[reserve(stack, tenant, 10, "same") for _ in range(20)])
    assert sum(not r["duplicate"] for r in results) == 1 and {r["charged"] for r in results} == {10}
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 90
    # The same key for another amount is a caller's bug, refused; the first charge stands.
    err = await expect_error("idempotency_key_reused", reserve(stack, tenant, 11, "same"))
    assert err.details == {"kind": "charge", "amount": 10}
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 90
    await stack.assert_books_balance(tenant)


async def test_racing_reservations_never_overdraw(stack):
    tenant = await stack.tenant(monthly=25)
    results = await asyncio.gather(*[reserve(stack, tenant, 3, f"k{i}") for i in range(20)], return_exceptions=True)
    granted = [r for r in results if isinstance(r, dict)]
    assert len(granted) == 8  # 8 × 3 = 24 <= 25 < 27
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 1
    await stack.assert_books_balance(tenant)


async def test_refunds_go_back_to_their_parts_once_and_never_exceed_the_charge(stack):
    tenant = await stack.tenant(monthly=3, purchased=10)
    await reserve(stack, tenant, 5, "c")  # 3 monthly + 2 purchased
    first = await stack.call("billing", "refund", tenant_id=tenant, idempotency_key="c:r1", of_key="c", amount=3)
    assert (first["to_purchased"], first["to_monthly"]) == (2, 1)  # purchased first
    again = await stack.call("billing", "refund", tenant_id=tenant, idempotency_key="c:r1", of_key="c", amount=3)
    assert again["duplicate"] and again["refunded"] == 3
    rest = await stack.call("billing", "refund", tenant_id=tenant, idempotency_key="c:r2", of_key="c")
    assert rest["refunded"] == 2 and rest["to_monthly"] == 2
    nothing = await stack.call("billing", "refund", tenant_id=tenant, idempotency_key="c:r3", of_key="c", amount=5)
    assert nothing["refunded"] == 0
    balance = await stack.call("billing", "balance", tenant_id=tenant)
    assert (balance["monthly"]["remaining"], balance["purchased"]["remaining"]) == (3, 10)
    await stack.assert_books_balance(tenant)


async def test_refunding_a_key_never_charged_voids_it_for_a_late_reserve(stack):
    tenant = await stack.tenant(monthly=10)
    out = await stack.call("billing", "refund", tenant_id=tenant, idempotency_key="late:refund", of_key="late")
    assert out["refunded"] == 0
    await expect_error("reservation_voided", reserve(stack, tenant, 4, "late"))
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 10
    await stack.assert_books_balance(tenant)


async def test_grants_pagination_and_unknown_tenants(stack):
    tenant = await stack.tenant(monthly=0)
    for i in range(5):
        await stack.call("billing", "grant", tenant_id=tenant, purchased=2, idempotency_key=f"g{i}")
    await stack.call("billing", "grant", tenant_id=tenant, purchased=2, idempotency_key="g0")  # repeat: no-op
    assert (await stack.call("billing", "balance", tenant_id=tenant))["purchased"]["remaining"] == 10
    page = await stack.call("billing", "ledger", tenant_id=tenant, limit=3)
    rest = await stack.call("billing", "ledger", tenant_id=tenant, limit=50, cursor=page["next_cursor"])
    keys = [e["idempotency_key"] for e in page["items"] + rest["items"]]
    assert len(keys) == len(set(keys)) == 7 and rest["next_cursor"] is None
    await expect_error("not_found", stack.call("billing", "balance", tenant_id="nobody"))
    await stack.assert_books_balance(tenant)


async def test_the_monthly_allowance_resets_once_when_the_period_ends(stack):
    tenant = await stack.tenant(monthly=10)
    await reserve(stack, tenant, 7, "m1")
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        await conn.execute("UPDATE billing.accounts SET period_end = now() - interval '1 second' WHERE tenant_id = $1", tenant)
    finally:
        await conn.close()
    balances = await asyncio.gather(*[stack.call("billing", "balance", tenant_id=tenant) for _ in range(5)])
    assert {b["monthly"]["remaining"] for b in balances} == {10}
    assert [e["amount"] for e in await stack.ledger(tenant) if e["kind"] == "reset"] == [7]
    await stack.assert_books_balance(tenant)


async def test_idempotency_keys_belong_to_their_tenant(stack):
    a, b = await stack.tenant(monthly=10), await stack.tenant(monthly=10)
    assert not (await reserve(stack, a, 4, "shared-key"))["duplicate"]
    assert not (await reserve(stack, b, 4, "shared-key"))["duplicate"]
    for tenant in (a, b):
        assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 6
        await stack.assert_books_balance(tenant)


async def test_a_refund_after_the_month_ended_gives_back_purchased_credits_only(stack):
    """Monthly credits expire with their month: a run charged in the last one and cancelled
    in this one gets its purchased part back, and this month's allowance stays what it is."""
    tenant = await stack.tenant(monthly=10)
    await stack.call("billing", "grant", tenant_id=tenant, purchased=5, idempotency_key="p5")
    charged = await reserve(stack, tenant, 12, "late-month")
    assert (charged["from_monthly"], charged["from_purchased"]) == (10, 2)
    conn = await asyncpg.connect(stack.settings.database_url)
    try:  # the charge was made last month, which has ended since
        await conn.execute("UPDATE billing.ledger SET at = at - interval '40 days' WHERE idempotency_key = 'late-month' "
                           "AND tenant_id = $1", tenant)
        await conn.execute("UPDATE billing.accounts SET period_start = now() - interval '31 days', "
                           "period_end = now() - interval '1 second' WHERE tenant_id = $1", tenant)
    finally:
        await conn.close()
    back = await stack.call("billing", "refund", tenant_id=tenant, idempotency_key="late-month:refund", of_key="late-month")
    assert (back["refunded"], back["to_monthly"], back["to_purchased"]) == (2, 0, 2)
    balance = await stack.call("billing", "balance", tenant_id=tenant)
    assert (balance["monthly"]["remaining"], balance["purchased"]["remaining"]) == (10, 5)
    await stack.assert_books_balance(tenant)


async def test_a_reservation_refunded_before_it_was_used_is_not_answered_as_charged(stack):
    """A compensation's refund reached billing but its answer was lost: the caller that
    replays the reservation must not be told it is charged (it would use it for free)."""
    tenant = await stack.tenant(monthly=10)
    await reserve(stack, tenant, 4, "given-up")
    await stack.call("billing", "refund", tenant_id=tenant, idempotency_key="given-up:refund", of_key="given-up")
    await expect_error("reservation_voided", reserve(stack, tenant, 4, "given-up"))
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 10
    await stack.assert_books_balance(tenant)
