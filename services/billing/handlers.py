"""Billing verbs. Money is protected by the ledger's UNIQUE idempotency key and the account
row lock, never by the broker: a repeated or concurrent request cannot charge twice."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared import opaque_cursor
from shared.db import transaction
from shared.faults import crash_point
from shared.messages import ServiceError
from services.billing import accounts
from services.billing.rules import split_charge, split_refund
from services.billing.schemas import Balance, Grant, Ledger, OpenAccount, Refund, Reserve

CURSOR_KEY = opaque_cursor.StoredKey("billing.cursor_key")  # migration b0003


def _charge_result(e: dict, duplicate: bool) -> dict:
    return {"charged": -e["amount"], "from_monthly": -e["monthly_part"], "from_purchased": -e["purchased_part"],
            "duplicate": duplicate}


async def open_account(engine: AsyncEngine, cmd: OpenAccount) -> dict:
    async with transaction(engine) as conn:
        return accounts.balance_view(await accounts.open_account(conn, cmd.tenant_id, cmd.monthly_allowance, cmd.purchased))


async def reserve(engine: AsyncEngine, cmd: Reserve) -> dict:
    """All or nothing: monthly credits first, then purchased; 402 when short."""
    async with transaction(engine) as conn:
        account = await accounts.lock(conn, cmd.tenant_id)
        existing = await accounts.entry(conn, cmd.tenant_id, cmd.idempotency_key)
        if existing is not None:
            if existing["kind"] == "void":
                raise ServiceError("reservation_voided", "this reservation was cancelled before it was made")
            if existing["kind"] != "charge" or -existing["amount"] != cmd.amount:
                # A replay must be the same request: answering a different amount with the
                # first one's result would hide a caller's bug behind a wrong balance.
                raise ServiceError("idempotency_key_reused",
                                   f"idempotency key {cmd.idempotency_key!r} was used for a different request",
                                   {"kind": existing["kind"], "amount": abs(existing["amount"])})
            if await accounts.refunded(conn, cmd.tenant_id, cmd.idempotency_key):
                # A replay comes before its charge is used: one already refunded was given up
                # (a compensation whose answer was lost). Answered as charged, it would be used
                # for free.
                raise ServiceError("reservation_voided", "this reservation was refunded before it was used")
            return _charge_result(existing, duplicate=True)
        split = split_charge(cmd.amount, account["monthly_remaining"], account["purchased_remaining"])
        if split is None:
            raise ServiceError("insufficient_credits", f"{cmd.amount} credits needed, "
                               f"{account['monthly_remaining'] + account['purchased_remaining']} available",
                               {"needed": cmd.amount,
                                "available": account["monthly_remaining"] + account["purchased_remaining"]})
        m, p = split
        if not await accounts.add_entry(conn, cmd.tenant_id, "charge", -cmd.amount, m=-m, p=-p,
                                        key=cmd.idempotency_key, run_id=cmd.run_id, actor=cmd.actor):
            # Cannot happen under the account lock; if it ever does, move no money.
            raise ServiceError("conflict", "this idempotency key is being used by another request")
        await accounts.move(conn, cmd.tenant_id, -m, -p)
        crash_point("billing_before_commit")  # mid-reservation: the transaction must vanish
        return {"charged": cmd.amount, "from_monthly": m, "from_purchased": p, "duplicate": False}


async def refund(engine: AsyncEngine, cmd: Refund) -> dict:
    async with transaction(engine) as conn:
        account = await accounts.lock(conn, cmd.tenant_id)
        done = await accounts.entry(conn, cmd.tenant_id, cmd.idempotency_key)
        if done is not None:
            return {"refunded": done["amount"], "to_monthly": done["monthly_part"], "to_purchased": done["purchased_part"],
                    "duplicate": True}
        charge = await accounts.entry(conn, cmd.tenant_id, cmd.of_key)
        if charge is None:
            # Never charged (or not yet): void the key so a late reserve cannot charge.
            await accounts.add_entry(conn, cmd.tenant_id, "void", 0, key=cmd.of_key, run_id=cmd.run_id, actor=cmd.actor)
            await accounts.add_entry(conn, cmd.tenant_id, "refund", 0, key=cmd.idempotency_key, run_id=cmd.run_id,
                                     refund_of=cmd.of_key, actor=cmd.actor)
            return {"refunded": 0, "to_monthly": 0, "to_purchased": 0, "duplicate": False}
        before = (await conn.execute(text(
            "SELECT CAST(coalesce(sum(monthly_part), 0) AS bigint), CAST(coalesce(sum(purchased_part), 0) AS bigint) "
            "FROM billing.ledger "
            "WHERE refund_of = :k AND tenant_id = :t"), {"k": cmd.of_key, "t": cmd.tenant_id})).one()
        amount = -charge["amount"] if cmd.amount is None else cmd.amount
        m, p = split_refund(amount, -charge["monthly_part"], -charge["purchased_part"], before[0], before[1])
        if m and charge["at"] < account["period_start"]:
            # Monthly credits of a period that has ended went with it (a reset never carries
            # them over): given back now, they would top this period's allowance up past itself.
            m = 0
        if not await accounts.add_entry(conn, cmd.tenant_id, "refund", m + p, m=m, p=p, key=cmd.idempotency_key,
                                        run_id=cmd.run_id, refund_of=cmd.of_key, actor=cmd.actor):
            raise ServiceError("conflict", "this idempotency key is being used by another request")
        await accounts.move(conn, cmd.tenant_id, m, p)
        return {"refunded": m + p, "to_monthly": m, "to_purchased": p, "duplicate": False}


async def balance(engine: AsyncEngine, cmd: Balance) -> dict:
    async with transaction(engine) as conn:
        return accounts.balance_view(await accounts.lock(conn, cmd.tenant_id))


async def ledger(engine: AsyncEngine, cmd: Ledger) -> dict:
    """A page of the tenant's entries, newest first. The cursor is the last entry's id, but
    enciphered (shared/opaque_cursor.py): the ids are one sequence for every tenant, and
    their gaps would tell a tenant how many entries the others made."""
    params = {"t": cmd.tenant_id, "limit": cmd.limit + 1}
    sql = "SELECT * FROM billing.ledger WHERE tenant_id = :t"
    scope = ("billing.ledger", cmd.tenant_id)  # a cursor reads on this tenant's ledger only
    async with engine.connect() as conn:
        key = await CURSOR_KEY.get(conn)
        if cmd.cursor:
            sql += " AND id < :c"
            params["c"] = opaque_cursor.reveal_or_refuse(key, cmd.cursor, *scope)
        rows = (await conn.execute(text(sql + " ORDER BY id DESC LIMIT :limit"), params)).mappings().all()
    items = [{"at": r["at"].isoformat(), "amount": r["amount"], "kind": r["kind"], "run_id": r["run_id"],
              "idempotency_key": r["idempotency_key"], "monthly_part": r["monthly_part"],
              "purchased_part": r["purchased_part"], "actor": r["actor"]} for r in rows[: cmd.limit]]
    last = rows[cmd.limit - 1] if len(rows) > cmd.limit else None
    return {"items": items, "next_cursor": opaque_cursor.hide(key, last["id"], *scope) if last is not None else None}


async def grant(engine: AsyncEngine, cmd: Grant) -> dict:
    async with transaction(engine) as conn:
        await accounts.lock(conn, cmd.tenant_id)
        key = cmd.idempotency_key or f"grant:{uuid.uuid4().hex}"
        if await accounts.add_entry(conn, cmd.tenant_id, "grant", cmd.purchased, p=cmd.purchased, key=key, actor=cmd.actor):
            await accounts.move(conn, cmd.tenant_id, 0, cmd.purchased)
        return accounts.balance_view(await accounts.lock(conn, cmd.tenant_id))
