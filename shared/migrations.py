"""Alembic, one schema per service: each service keeps its tables and its own version table
in its own PostgreSQL schema, so that no service can depend on another's tables.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from shared.settings import Settings

SERVICES_WITH_SCHEMAS = ("gateway", "coordinator", "billing", "notifier")
_ROOT = Path(__file__).resolve().parent.parent / "services"

# Arbitrary constant: serialises concurrent `migrate` runs (several replicas starting).
_ADVISORY_LOCK_KEY = 0x7265647276


def alembic_config(service: str, url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_ROOT / service / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    config.attributes["schema"] = service
    return config


def run_env(context) -> None:
    """Body of every service's migrations/env.py (online mode, async engine)."""
    config = context.config
    schema = config.attributes["schema"]
    url = config.get_main_option("sqlalchemy.url")

    def do_run(connection) -> None:
        connection.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        context.configure(
            connection=connection,
            version_table="alembic_version",
            version_table_schema=schema,
            include_schemas=True,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def main() -> None:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
                try:
                    await conn.run_sync(do_run)
                    await conn.commit()
                except BaseException:
                    await conn.rollback()
                    raise
                finally:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _ADVISORY_LOCK_KEY})
                    await conn.commit()
        finally:
            await engine.dispose()

    asyncio.run(main())


def execute_script(op, sql: str) -> None:
    """Run a multi-statement DDL script: asyncpg prepares statements one at a time, so a
    script is split on the semicolons that end its lines."""
    for statement in sql.split(";\n"):
        if statement.strip():
            op.execute(statement)


def _upgrade_sync(settings: Settings, services: tuple[str, ...]) -> None:
    for service in services:
        command.upgrade(alembic_config(service, settings.sqlalchemy_url), "head")


async def migrate(settings: Settings, services: tuple[str, ...] = SERVICES_WITH_SCHEMAS) -> None:
    """Apply every service's migrations (idempotent). Alembic's env runs its own loop, so
    it runs in a worker thread here."""
    await asyncio.to_thread(_upgrade_sync, settings, services)


def migrate_sync(settings: Settings, services: tuple[str, ...] = SERVICES_WITH_SCHEMAS) -> None:
    _upgrade_sync(settings, services)
