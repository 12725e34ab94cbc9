"""Per-tenant automatic retry and breaker settings; applied to jobs published afterwards.

A PUT changes the settings it names and keeps the others (shared/requests.py:
SettingsBody): read, merged and written under the tenant's row lock, so two PUTs of
different settings both hold, and checked whole (a new base above the stored maximum is
refused, naming it).
"""

from __future__ import annotations

import orjson
from sqlalchemy import text

from shared.db import transaction
from shared.messages import RetryPolicy, ServiceError
from services.coordinator import store
from services.coordinator.context import Deps
from services.coordinator.schemas import Caller, PutSettings

_LOCK = text("INSERT INTO coordinator.retry_settings (tenant_id, policy) VALUES (:t, CAST(:p AS jsonb)) "
             "ON CONFLICT (tenant_id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id RETURNING policy")
_SAVE = text("UPDATE coordinator.retry_settings SET policy = CAST(:p AS jsonb), updated_at = now() WHERE tenant_id = :t")


async def get_settings(deps: Deps, cmd: Caller) -> dict:
    async with deps.engine.connect() as conn:
        return (await store.retry_policy(conn, cmd.tenant_id)).model_dump()


async def put_settings(deps: Deps, cmd: PutSettings) -> dict:
    given = cmd.given()
    async with transaction(deps.engine) as conn:
        # The upsert takes the row lock whether the tenant had settings or not.
        stored = (await conn.execute(_LOCK, {"t": cmd.tenant_id, "p": RetryPolicy().model_dump_json()})).scalar_one()
        merged = {**RetryPolicy.model_validate(stored).model_dump(), **given}
        if merged["backoff_max_ms"] < merged["backoff_base_ms"]:
            field = "backoff_max_ms" if "backoff_max_ms" in given else "backoff_base_ms"
            raise ServiceError("validation_error", "backoff_max_ms must be at least backoff_base_ms",
                               {"fields": {field: f"backoff_base_ms {merged['backoff_base_ms']} is above "
                                                  f"backoff_max_ms {merged['backoff_max_ms']}"}})
        policy = RetryPolicy.model_validate(merged)
        await conn.execute(_SAVE, {"t": cmd.tenant_id, "p": orjson.dumps(policy.model_dump()).decode()})
    return policy.model_dump()
