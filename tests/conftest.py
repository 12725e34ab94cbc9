from __future__ import annotations

import asyncpg
import pytest

from shared.settings import Settings
from tests.servers import Servers, create_database, new_prefix, start_servers


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Servers:
    found = start_servers(tmp_path_factory.mktemp("servers"))
    yield found
    found.close()


@pytest.fixture(scope="session")
async def make_settings(servers, tmp_path_factory):
    """Settings for a fresh, isolated system: its own database (migrated) and prefix."""
    created: list[str] = []

    async def make(migrate: bool = True, **overrides) -> Settings:
        from shared.migrations import migrate as run_migrations

        database_url = await create_database(servers.admin_database_url)
        created.append(database_url.rpartition("/")[2])
        settings = Settings(
            nats_url=servers.nats_url,
            database_url=database_url,
            data_dir=tmp_path_factory.mktemp("data"),
            prefix=new_prefix(),
            **overrides,
        )
        if migrate:
            await run_migrations(settings)
        return settings

    yield make

    conn = await asyncpg.connect(servers.admin_database_url)
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
