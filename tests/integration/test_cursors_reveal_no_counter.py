"""The credit ledger's and a run timeline's cursors, over the real services: they page a
tenant's own entries exactly once and in order, yet tell nothing of the other tenants.

Both lists are read by a counter every tenant shares (``billing.ledger.id``,
``coordinator.timeline.id``). Given as the cursor, that counter told a tenant how much the
others did between two of its own entries: 7 other tenants' charges were a gap of 7."""

from __future__ import annotations

import base64
import binascii

import pytest

from tests.stack import Stack, expect_error


@pytest.fixture(scope="module")
async def stack(make_settings):
    # No executor: a run's files stay PENDING, so its log grows only when we act on it.
    s = await Stack(await make_settings()).start("billing", "coordinator")
    yield s
    await s.stop()


def numbers_in(cursor: str) -> list[int]:
    """The integers a cursor could carry in plain sight: itself in decimal, or its bytes
    (a counter merely base64-encoded is a counter still)."""
    found = [int(cursor)] if cursor.isascii() and cursor.isdigit() else []
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        return found
    return found + [int.from_bytes(raw, "big"), int.from_bytes(raw, "little")]


def assert_reveals_no_gap(cursors: list[str], others: int) -> None:
    """Consecutive cursors must not differ by what the other tenants did between them."""
    assert cursors and all(not (c.isascii() and c.isdigit()) for c in cursors), cursors
    assert len({len(c) for c in cursors}) == 1, cursors  # the length tells no magnitude either
    for before, after in zip(cursors, cursors[1:]):
        for a in numbers_in(before):
            for b in numbers_in(after):
                assert abs(a - b) - 1 != others, (before, after)


def tampered(cursor: str) -> list[str]:
    """The cursor with one character changed, at each end and in the middle."""
    out = []
    for at in (0, len(cursor) // 2, len(cursor) - 1):
        swap = "A" if cursor[at] != "A" else "B"
        out.append(cursor[:at] + swap + cursor[at + 1:])
    return out


async def bad_cursor(stack, verb: str, cursor: str, **payload) -> None:
    service = "billing" if verb == "ledger" else "coordinator"
    err = await expect_error("validation_error", stack.call(service, verb, cursor=cursor, **payload))
    assert "cursor" in err.details["fields"], err.details


async def pages(stack, service: str, verb: str, **payload) -> tuple[list[dict], list[str]]:
    """Every item, one per page, and the cursor each page gave."""
    items, cursors, cursor = [], [], None
    while True:
        page = await stack.call(service, verb, limit=1, cursor=cursor, **payload)
        items += page["items"]
        if (cursor := page["next_cursor"]) is None:
            return items, cursors
        cursors.append(cursor)


async def test_the_ledger_pages_a_tenants_own_entries_and_its_cursor_counts_nobody_elses(stack):
    mine, theirs = await stack.tenant(monthly=100), await stack.tenant(monthly=100)
    for key in ("k1", "k2"):
        await stack.call("billing", "reserve", tenant_id=mine, amount=1, idempotency_key=key)
    first = await stack.call("billing", "ledger", tenant_id=mine, limit=1)
    others = 7
    for i in range(others):  # another tenant's charges, between two of mine
        await stack.call("billing", "reserve", tenant_id=theirs, amount=1, idempotency_key=f"t{i}")
    await stack.call("billing", "reserve", tenant_id=mine, amount=1, idempotency_key="k3")

    whole = (await stack.call("billing", "ledger", tenant_id=mine, limit=500))["items"]
    assert [e["idempotency_key"] for e in whole][:3] == ["k3", "k2", "k1"]  # then the opening's
    items, cursors = await pages(stack, "billing", "ledger", tenant_id=mine)
    assert items == whole  # each once, newest first
    assert_reveals_no_gap(cursors, others)
    # The cursor of k2, read before the other tenant's charges, still reads on from k2.
    rest = await stack.call("billing", "ledger", tenant_id=mine, limit=500, cursor=first["next_cursor"])
    assert rest["items"] == whole[2:] and rest["next_cursor"] is None
    assert first["next_cursor"] == cursors[1]  # a position has one cursor: the same on every read

    for cursor in ("garbage", "12", "0" * 20, str(2**63), "-1", "A" * 22, *tampered(cursors[0])):
        await bad_cursor(stack, "ledger", cursor, tenant_id=mine)
    # Another tenant's cursor is no cursor of this tenant's ledger.
    theirs_cursor = (await stack.call("billing", "ledger", tenant_id=theirs, limit=1))["next_cursor"]
    await bad_cursor(stack, "ledger", theirs_cursor, tenant_id=mine)


async def test_a_runs_timeline_pages_its_entries_and_its_cursor_counts_nobody_elses(stack):
    mine, theirs = await stack.tenant(), await stack.tenant()
    steps = [{"name": "a", "handler": "noop"}]
    run = await stack.submit(mine, await stack.template(mine, steps), 2)
    before = (await stack.call("coordinator", "timeline", tenant_id=mine, run_id=run["id"], limit=500))["items"]
    their_template = await stack.template(theirs, steps)
    others = 0
    for _ in range(3):  # another tenant's runs log between two entries of mine
        their_run = await stack.submit(theirs, their_template, 1)
        others += len((await stack.call("coordinator", "timeline", tenant_id=theirs, run_id=their_run["id"]))["items"])
    assert others > 0
    await stack.call("coordinator", "cancel", tenant_id=mine, run_id=run["id"], actor="test")

    whole = (await stack.call("coordinator", "timeline", tenant_id=mine, run_id=run["id"]))["items"]
    assert whole[: len(before)] == before and len(whole) > len(before)  # the cancel's entries came after
    items, cursors = await pages(stack, "coordinator", "timeline", tenant_id=mine, run_id=run["id"])
    assert items == whole  # each once, oldest first
    assert_reveals_no_gap(cursors, others)
    # Read on from the last entry before the other tenant's runs: the cancel's entries, no more.
    at = cursors[len(before) - 1]
    rest = await stack.call("coordinator", "timeline", tenant_id=mine, run_id=run["id"], cursor=at)
    assert rest["items"] == whole[len(before):] and rest["next_cursor"] is None

    ref = dict(tenant_id=mine, run_id=run["id"])
    for cursor in ("garbage", "12", "0" * 18, str(2**63), "-1", "A" * 22, *tampered(cursors[0])):
        await bad_cursor(stack, "timeline", cursor, **ref)
    # Another run's cursor is no cursor of this run's log (nor of the same tenant's other runs).
    their_cursor = (await stack.call("coordinator", "timeline", tenant_id=theirs, run_id=their_run["id"],
                                     limit=1))["next_cursor"]
    await bad_cursor(stack, "timeline", their_cursor, **ref)
