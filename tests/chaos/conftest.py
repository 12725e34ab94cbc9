"""Chaos scenarios run on servers of their own (always the embedded ones, even when
NATS_URL / DATABASE_URL are set): they stop and restart them."""

from __future__ import annotations

import shutil

import pytest

from shared.embedded import PG_FALLBACK_ROOT, EmbeddedNats, EmbeddedPostgres
from shared.migrations import migrate
from shared.settings import Settings
from tests.conftest import CHAOS_FIGURE
from tests.servers import create_database, new_prefix

FIGURES: list[dict] = []  # a scenario's, until its report takes them


class ChaosServers:
    def __init__(self, root) -> None:
        self.nats = EmbeddedNats(root / "nats").start()
        self.pg = EmbeddedPostgres(root / "pg")
        self.pg.start()

    def close(self) -> None:
        self.nats.stop()
        self.pg.stop()
        if PG_FALLBACK_ROOT in self.pg.pgdata.parents:
            shutil.rmtree(self.pg.pgdata, ignore_errors=True)


@pytest.fixture(scope="session")
def chaos_servers(tmp_path_factory):
    servers = ChaosServers(tmp_path_factory.mktemp("chaos"))
    yield servers
    servers.close()


@pytest.fixture
async def chaos_settings(chaos_servers, tmp_path):
    async def make(**overrides) -> Settings:
        url = await create_database(chaos_servers.pg.admin_url)
        # Results held by a killed coordinator come back within the lease (as with the defaults).
        base = dict(recovery_interval_s=0.5, recovery_lease_s=4.0, results_ack_wait_s=2.0,
                    credit_intent_timeout_s=1.0, executor_ack_wait_s=2.0,
                    handlers="tests.chaos.handlers", request_timeout_s=5,
                    executor_concurrency=8)  # work spread over seconds, so faults land mid-run
        settings = Settings(nats_url=chaos_servers.nats.url, database_url=url, data_dir=tmp_path, prefix=new_prefix(),
                            **{**base, **overrides})
        await migrate(settings)
        return settings

    return make


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A scenario's figures travel on its report (to xdist's controller too), where the
    summary (tests/conftest.py) finds them."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        while FIGURES:
            report.user_properties.append((CHAOS_FIGURE, FIGURES.pop(0)))
