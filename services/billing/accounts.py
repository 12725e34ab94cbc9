"""Account rows: lock, lazy monthly reset, ledger entries. Every statement is tenant-scoped."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.messages import ServiceError
from services.billing.rules import month_bounds

_INSERT_ENTRY = text(
    "INSERT INTO billing.ledger (tenant_id, kind, amount, monthly_part, purchased_part, run_id, idempotency_key, refund_of, actor) "
    "VALUES (:tenant_id, :kind, :amount, :m, :p, :run_id, :key, :refund_of, :actor) "
    "ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING id"
)


async def lock(conn: AsyncConnection, tenant_id: str) -> dict:
    """The tenant's account, locked until commit, with the month rolled over if it ended."""
    row = (await conn.execute(text("SELECT *, now() AS db_now FROM billing.accounts WHERE tenant_id = :t FOR UPDATE"),
                              {"t": tenant_id})).mappings().first()
    if row is None:
        raise ServiceError("not_found", f"no billing account for tenant {tenant_id}")
    account = dict(row)
    if account["period_end"] <= account["db_now"]:
        start, end = month_bounds(account["db_now"])
        topped_up = account["monthly_allowance"] - account["monthly_remaining"]
        await add_entry(conn, tenant_id, "reset", topped_up, m=topped_up, key=f"reset:{tenant_id}:{start.date().isoformat()}")
        account = dict((await conn.execute(text(
            "UPDATE billing.accounts SET monthly_remaining = monthly_allowance, period_start = :s, period_end = :e, "
            "updated_at = now() WHERE tenant_id = :t RETURNING *"), {"s": start, "e": end, "t": tenant_id})).mappings().one())
    return account


async def add_entry(conn: AsyncConnection, tenant_id: str, kind: str, amount: int, *, key: str, m: int = 0, p: int = 0,
                    run_id: str | None = None, refund_of: str | None = None, actor: str | None = None) -> bool:
    """Append a ledger entry; False if its idempotency key is already there (nothing written)."""
    inserted = await conn.execute(_INSERT_ENTRY, {"tenant_id": tenant_id, "kind": kind, "amount": amount, "m": m, "p": p,
                                                  "run_id": run_id, "key": key, "refund_of": refund_of, "actor": actor})
    return inserted.first() is not None


async def move(conn: AsyncConnection, tenant_id: str, monthly: int, purchased: int) -> dict:
    return dict((await conn.execute(text(
        "UPDATE billing.accounts SET monthly_remaining = monthly_remaining + :m, "
        "purchased_remaining = purchased_remaining + :p, updated_at = now() WHERE tenant_id = :t RETURNING *"),
        {"m": monthly, "p": purchased, "t": tenant_id})).mappings().one())


async def entry(conn: AsyncConnection, tenant_id: str, key: str) -> dict | None:
    row = (await conn.execute(text("SELECT * FROM billing.ledger WHERE idempotency_key = :k AND tenant_id = :t"),
                              {"k": key, "t": tenant_id})).mappings().first()
    return dict(row) if row else None


async def refunded(conn: AsyncConnection, tenant_id: str, charge_key: str) -> bool:
    """Whether any refund of the charge made under ``charge_key`` is in the ledger."""
    return (await conn.execute(text("SELECT EXISTS (SELECT 1 FROM billing.ledger WHERE refund_of = :k AND tenant_id = :t)"),
                               {"k": charge_key, "t": tenant_id})).scalar_one()


def balance_view(account: dict) -> dict:
    return {
        "monthly": {"allowance": account["monthly_allowance"], "remaining": account["monthly_remaining"],
                    "period_end": account["period_end"].isoformat()},
        "purchased": {"remaining": account["purchased_remaining"]},
    }


async def open_account(conn: AsyncConnection, tenant_id: str, monthly: int, purchased: int) -> dict:
    start, end = month_bounds(datetime.now(timezone.utc))
    created = await conn.execute(text(
        "INSERT INTO billing.accounts (tenant_id, monthly_allowance, monthly_remaining, period_start, period_end, "
        "purchased_remaining) VALUES (:t, :m, :m, :s, :e, :p) ON CONFLICT (tenant_id) DO NOTHING RETURNING tenant_id"),
        {"t": tenant_id, "m": monthly, "p": purchased, "s": start, "e": end})
    if created.first() is not None:
        # Opening balances are ledger entries too, so the ledger always sums to the balance.
        await add_entry(conn, tenant_id, "grant", monthly, m=monthly, key=f"open:{tenant_id}:monthly", actor="system")
        await add_entry(conn, tenant_id, "grant", purchased, p=purchased, key=f"open:{tenant_id}:purchased", actor="system")
    return await lock(conn, tenant_id)
