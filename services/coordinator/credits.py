"""Charging through billing without ever charging twice or losing a refund.

The coordinator cannot hold billing's tables in its transaction, so a charge is a small
saga: (1) commit an *intent* naming the billing idempotency key, (2) ask billing to
reserve with that key, (3) apply the run change and mark the intent ``applied`` in one
transaction. If (3) fails, the intent is compensated at once; if the process dies first,
the recovery sweep finds the old ``pending`` intent and compensates it. Compensation asks
billing to refund the key, and billing voids a key it never charged, so a reserve that
arrives late can no longer charge.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from shared.db import transaction
from shared.faults import crash_point
from shared.messages import ServiceError
from shared.rpc import COMMIT_MARGIN_S, RpcClient, caller_time_left, ensure_caller_waits
from services.coordinator import timeline

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Charge:
    key: str
    charged: int
    from_monthly: int
    from_purchased: int


def initiate_key(run_id: str) -> str:
    return f"{run_id}:initiate"


def retry_key(run_id: str, round_: int) -> str:
    return f"{run_id}:retry:{round_}"


def file_retry_key(run_id: str, file_index: int, retry_attempt: int) -> str:
    return f"{run_id}:file:{file_index}:retry:{retry_attempt}"


def compensation_key(charge_key: str) -> str:
    """messaging.md's refund keys: ``<run_id>:refund:<round>`` for a round's charge."""
    run_id, _, rest = charge_key.partition(":")
    if rest == "initiate":
        return f"{run_id}:refund:0"
    if rest.startswith("retry:"):
        return f"{run_id}:refund:{rest.removeprefix('retry:')}"
    return f"{charge_key}:refund"


# Billing's answers that prove nothing was charged: the intent is simply withdrawn.
_DEFINITE_REFUSALS = {"insufficient_credits", "validation_error", "not_found", "bad_request"}
# What a request hears when an earlier attempt under its key was settled for good (refunded or
# voided) before this one could apply its charge. Nothing was made or charged, and the same
# request again goes through under a fresh key (fresh_key): a 503, so that the gateway lets the
# client's same Idempotency-Key through again instead of replaying this answer for 24 h.
_TRY_AGAIN = ("the credit reservation of an earlier attempt was withdrawn meanwhile; nothing was made or charged: "
              "send the request again (the same Idempotency-Key will do)")


async def fresh_key(engine: AsyncEngine, base_key: str) -> str:
    """``base_key``, unless a reservation under it was already compensated: billing has
    refunded or voided that key for good, so a new attempt needs a new key."""
    async with engine.connect() as conn:
        used = (
            await conn.execute(
                text("SELECT count(*) FROM coordinator.credit_intents WHERE (key = :k OR key LIKE :like) AND state = 'compensated'"),
                {"k": base_key, "like": base_key + ".%"},
            )
        ).scalar_one()
    return base_key if used == 0 else f"{base_key}.{used}"


async def reserve(
    engine: AsyncEngine, billing: RpcClient, *, key: str, run_id: str, tenant_id: str, amount: int, actor: str
) -> Charge:
    """Steps (1) and (2). Raises billing's ServiceError (e.g. insufficient_credits) after
    withdrawing the intent, so a refused charge leaves nothing behind."""
    ensure_caller_waits(2 * COMMIT_MARGIN_S)  # a charge its caller would not wait for: none at all
    async with transaction(engine) as conn:
        await conn.execute(
            text(
                "INSERT INTO coordinator.credit_intents (key, run_id, tenant_id, amount) "
                "VALUES (:key, :run_id, :tenant_id, :amount) ON CONFLICT (key) DO NOTHING"
            ),
            {"key": key, "run_id": run_id, "tenant_id": tenant_id, "amount": amount},
        )
    try:
        reply = await billing.call(
            "billing", "reserve",
            {"tenant_id": tenant_id, "amount": amount, "idempotency_key": key, "run_id": run_id, "actor": actor},
            timeout=_reserve_timeout_s(),
        )
    except ServiceError as exc:
        if exc.code == "reservation_voided":
            # Billing settled this key for good (a compensation whose answer we lost): spent.
            await _settled(engine, key)
            raise ServiceError("service_unavailable", _TRY_AGAIN, {"outcome": "none"}) from exc
        if exc.code == "idempotency_key_reused":
            # An earlier attempt, which died after its charge, charged this key for another
            # amount (a file was skipped since): refunded here, and the next attempt takes a
            # fresh key. Billing's key is ours, not the client's: never told as theirs.
            # Within the caller's time too: this runs while the caller's transaction holds its run.
            await compensate(engine, billing, key=key, tenant_id=tenant_id, run_id=run_id, timeout=_reserve_timeout_s())
            raise ServiceError("service_unavailable", _TRY_AGAIN, {"outcome": "none"}) from exc
        if exc.code in _DEFINITE_REFUSALS:
            await _withdraw(engine, key)
        else:  # unknown outcome (timeout, billing down): refund or void the key
            # Within the caller's time too: this runs while the caller's transaction holds its run.
            await compensate(engine, billing, key=key, tenant_id=tenant_id, run_id=run_id, timeout=_reserve_timeout_s())
        raise
    crash_point("after_reserve")  # charged, run not yet updated: the sweep must refund
    return Charge(key, reply["charged"], reply["from_monthly"], reply["from_purchased"])


def _reserve_timeout_s() -> float | None:
    """The reserve's wait, within what the request's caller waits (less the commit's
    margin): waiting longer, the request held its run's claim after the gateway had told
    its client 503, and the client's retry under the same key met a 409 it then kept."""
    left = caller_time_left()
    return None if left is None else max(0.1, left - 2 * COMMIT_MARGIN_S)


async def _withdraw(engine: AsyncEngine, key: str) -> None:
    async with transaction(engine) as conn:
        await conn.execute(
            text("DELETE FROM coordinator.credit_intents WHERE key = :key AND state = 'pending'"), {"key": key}
        )


async def _settled(engine: AsyncEngine, key: str) -> None:
    async with transaction(engine) as conn:
        await conn.execute(
            text("UPDATE coordinator.credit_intents SET state = 'compensated' WHERE key = :key AND state = 'pending'"),
            {"key": key},
        )


async def mark_applied(conn: AsyncConnection, key: str) -> bool:
    """Step (3), inside the caller's transaction. False if the intent was compensated
    meanwhile (a very slow request overtaken by the sweep): the caller must roll back."""
    result = await conn.execute(
        text("UPDATE coordinator.credit_intents SET state = 'applied' WHERE key = :key AND state = 'pending'"),
        {"key": key},
    )
    return result.rowcount == 1


async def apply(conn: AsyncConnection, charge: Charge, *, run_id: str, tenant_id: str, actor: str,
                file_index: int | None = None) -> None:
    """Step (3)'s bookkeeping, in the caller's transaction: the charge in the run's
    timeline, and the intent marked applied (or the transaction refused)."""
    await timeline.append(conn, timeline.entry(
        run_id, tenant_id, "charge", actor, file_index, amount=charge.charged, from_monthly=charge.from_monthly,
        from_purchased=charge.from_purchased, key=charge.key))
    if not await mark_applied(conn, charge.key):
        raise ServiceError("service_unavailable", _TRY_AGAIN, {"outcome": "none"})


async def compensate(engine: AsyncEngine, billing: RpcClient, *, key: str, tenant_id: str, run_id: str,
                     timeout: float | None = None) -> bool:
    """Refund (or void) the charge made under ``key`` unless it was applied. Idempotent.
    ``timeout``: how long billing is waited for (a refund not made in time is left to the
    sweep, which compensates what stays pending)."""
    async with transaction(engine) as conn:
        row = (
            await conn.execute(
                text("SELECT state FROM coordinator.credit_intents WHERE key = :key FOR UPDATE"), {"key": key}
            )
        ).first()
        if row is None or row[0] != "pending":
            return False
        try:
            reply = await billing.call(
                "billing", "refund",
                {"tenant_id": tenant_id, "idempotency_key": compensation_key(key), "of_key": key,
                 "run_id": run_id, "actor": "system:compensation"},
                timeout=timeout,
            )
        except Exception as exc:
            log.warning("credits.compensation_failed", key=key, error=repr(exc))
            return False
        await conn.execute(
            text("UPDATE coordinator.credit_intents SET state = 'compensated' WHERE key = :key"), {"key": key}
        )
        # A run whose creation was compensated never existed: its timeline rows would be
        # nobody's, and retention, which prunes by run, would keep them for ever.
        if (await conn.execute(text("SELECT 1 FROM coordinator.runs WHERE id = :r"), {"r": run_id})).first() is None:
            log.info("credits.compensated", key=key, run_id=run_id, run="never made")
            return True
        await timeline.append(conn, timeline.entry(
            run_id, tenant_id, "refund", "system:compensation", amount=reply.get("refunded", 0),
            to_monthly=reply.get("to_monthly"), to_purchased=reply.get("to_purchased"), key=compensation_key(key),
            reason="the run change was not applied after the charge"))
    log.info("credits.compensated", key=key, run_id=run_id)
    return True


async def compensate_abandoned(engine: AsyncEngine, billing: RpcClient, older_than_s: float) -> int:
    """The sweep: compensate intents left pending by a crash (older than any live request)."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT key, tenant_id, run_id FROM coordinator.credit_intents WHERE state = 'pending' "
                    # At random, not oldest first: a hundred whose compensation keeps failing
                    # (billing refusing them) would otherwise hold back every newer one.
                    "AND created_at < now() - make_interval(secs => :age) ORDER BY random() LIMIT 100"
                ),
                {"age": older_than_s},
            )
        ).all()
    done = 0
    for key, tenant_id, run_id in rows:
        done += await compensate(engine, billing, key=key, tenant_id=tenant_id, run_id=run_id)
    return done


async def refund(
    billing: RpcClient, *, tenant_id: str, run_id: str, key: str, of_key: str, amount: int, actor: str
) -> dict:
    return await billing.call(
        "billing", "refund",
        {"tenant_id": tenant_id, "idempotency_key": key, "of_key": of_key, "amount": amount, "run_id": run_id, "actor": actor},
    )
