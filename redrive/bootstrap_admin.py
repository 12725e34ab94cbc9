"""Identity chores the CLI does directly against the database (no service needed): the
platform admin key of `redrive up`, tenants, API keys. Each goes through the owning
service's own module (gateway identity, billing accounts)."""

from __future__ import annotations

import asyncio
import os

from shared.db import make_engine
from shared.requests import control_character
from shared.settings import Settings

PLATFORM_TENANT = "platform"
MAX_TENANT_NAME = 200  # characters


def tenant_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a tenant, or None: it is shown in listings and logs, one line each."""
    if not name.strip():
        return "the tenant name must not be empty"
    if len(name) > MAX_TENANT_NAME:
        return f"the tenant name is {len(name)} characters long: at most {MAX_TENANT_NAME}"
    if (problem := control_character(name)) is not None:
        return f"the tenant name {problem}"
    return None


async def create_tenant(settings: Settings, name: str, monthly: int = 0, purchased: int = 0, tenant_id: str | None = None) -> str:
    from services.billing.admin import open_account_direct
    from services.gateway.identity import create_tenant as gateway_create_tenant

    if (problem := tenant_name_problem(name)) is not None:
        raise ValueError(problem)
    engine = make_engine(settings, pool_size=1)
    try:
        tenant_id = await gateway_create_tenant(engine, name, tenant_id=tenant_id)
    finally:
        await engine.dispose()
    await open_account_direct(settings, tenant_id, monthly, purchased)
    return tenant_id


async def create_key(settings: Settings, tenant_id: str, role: str, user: str) -> str:
    return (await make_key(settings, tenant_id, role, user))[1]


async def make_key(settings: Settings, tenant_id: str, role: str, user: str) -> tuple[str, str]:
    """A new key and its id: (id, key)."""
    from services.gateway.identity import make_key as gateway_make_key

    return await with_gateway_engine(settings, lambda engine: gateway_make_key(engine, tenant_id, role, user))


async def with_gateway_engine(settings: Settings, use):
    """``use(engine)`` with a one-connection engine on the gateway's tables, disposed after."""
    engine = make_engine(settings, pool_size=1)
    try:
        return await use(engine)
    finally:
        await engine.dispose()


def ensure_admin_key(settings: Settings) -> str:
    """The platform admin key, made on the first `up` and kept in DATA_DIR/admin.key (0600)."""
    path = settings.data_dir / "admin.key"
    if path.exists():
        return path.read_text().strip()

    async def make() -> str:
        tenant = await create_tenant(settings, PLATFORM_TENANT, monthly=0, purchased=0, tenant_id=PLATFORM_TENANT)
        return await create_key(settings, tenant, "platform_admin", "admin")

    key = asyncio.run(make())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key
