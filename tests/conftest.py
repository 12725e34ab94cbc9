from __future__ import annotations

import shutil

import asyncpg
import pytest

from shared.embedded import PG_FALLBACK_ROOT
from shared.settings import Settings
from tests.servers import Servers, create_database, new_prefix, start_servers


# As root, an embedded PostgreSQL whose data dir lies under pytest's 0700 temp dirs keeps
# its cluster in PG_FALLBACK_ROOT (shared/embedded/), outside them: ~50 MB a test of
# `redrive up` or the chaos stacks. The clusters this session made are removed once stopped,
# by the process that runs the session: with xdist, the controller, after every worker has
# finished (a worker that finished first would take another's cluster still being made).
_CLUSTERS_BEFORE = "redrive_clusters_before"


def _clusters() -> set:
    return set(PG_FALLBACK_ROOT.iterdir()) if PG_FALLBACK_ROOT.is_dir() else set()


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session):
    if not _is_xdist_worker(session.config):
        setattr(session.config, _CLUSTERS_BEFORE, _clusters())


CHAOS_FIGURE = "chaos_figure"  # a chaos scenario's figures, on its report (tests/chaos/conftest.py)


def pytest_terminal_summary(terminalreporter):
    figures = [value for reports in terminalreporter.stats.values() for r in reports
               for key, value in getattr(r, "user_properties", ()) if key == CHAOS_FIGURE]
    if figures:
        terminalreporter.write_sep("-", "chaos figures")
        for f in figures:
            terminalreporter.write_line(
                f"{f['scenario']:<40} lost={f['files_lost']} double_charged={f['double_charges']} "
                f"reran_before_checkpoint={f['steps_rerun_before_checkpoint']} recovery_s={f['recovery_s']:.1f}")


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, _CLUSTERS_BEFORE, None)
    if before is None:
        return
    for cluster in _clusters() - before:
        if not (cluster / "postmaster.pid").exists():
            shutil.rmtree(cluster, ignore_errors=True)


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

    if servers.owns_postgres:
        return
    conn = await asyncpg.connect(servers.admin_database_url)
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
