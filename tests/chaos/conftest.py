"""Chaos scenarios run on servers of their own (always the embedded ones, even when
NATS_URL / DATABASE_URL are set): they stop and restart them."""

from __future__ import annotations

import shutil

import pytest

from shared.embedded import PG_FALLBACK_ROOT, EmbeddedNats, EmbeddedPostgres
from shared.migrations import migrate
from shared.settings import Settings
from tests.servers import create_database, new_prefix

FIGURES: list[dict] = []


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


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "chaos figures")
        for f in FIGURES:
            terminalreporter.write_line(
                f"{f['scenario']:<40} lost={f['files_lost']} double_charged={f['double_charges']} "
                f"reran_before_checkpoint={f['steps_rerun_before_checkpoint']} recovery_s={f['recovery_s']:.1f}")
