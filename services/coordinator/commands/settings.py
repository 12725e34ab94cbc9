"""Per-tenant automatic retry and breaker settings; applied to jobs published afterwards."""

from __future__ import annotations

import orjson
from sqlalchemy import text

from shared.db import transaction
from shared.messages import RetryPolicy
from services.coordinator import store
from services.coordinator.context import Deps
from services.coordinator.schemas import Caller, PutSettings


async def get_settings(deps: Deps, cmd: Caller) -> dict:
    async with deps.engine.connect() as conn:
        return (await store.retry_policy(conn, cmd.tenant_id)).model_dump()


async def put_settings(deps: Deps, cmd: PutSettings) -> dict:
    policy = RetryPolicy.model_validate(cmd.model_dump(include=set(RetryPolicy.model_fields)))
    async with transaction(deps.engine) as conn:
        await conn.execute(text(
            "INSERT INTO coordinator.retry_settings (tenant_id, policy) VALUES (:t, CAST(:p AS jsonb)) "
            "ON CONFLICT (tenant_id) DO UPDATE SET policy = EXCLUDED.policy, updated_at = now()"),
            {"t": cmd.tenant_id, "p": orjson.dumps(policy.model_dump()).decode()})
    return policy.model_dump()
