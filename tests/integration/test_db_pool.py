"""The pool pings a connection that sat idle before handing it out, and replaces it when
its server side is gone (a PostgreSQL restart, an admin's pg_terminate_backend): the caller
never sees the dead connection. A connection given back a moment ago is not pinged."""

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

from shared import db
from shared.db import make_engine, transaction
from shared.errors import TransientError


async def _backend_pid(engine) -> int:
    async with transaction(engine) as conn:
        return (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()


async def _terminate(settings, pid: int) -> None:
    admin = await asyncpg.connect(settings.database_url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        # Gone from pg_stat_activity: the pooled connection's socket is closed by now.
        while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            pass
    finally:
        await admin.close()


async def test_an_idle_connection_whose_backend_died_is_replaced_before_use(make_settings, monkeypatch):
    settings = await make_settings()
    engine = make_engine(settings, pool_size=1)
    try:
        first = await _backend_pid(engine)
        await _terminate(settings, first)
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)  # idle "long enough" at once
        second = await _backend_pid(engine)  # no error: pinged, found dead, replaced
        assert second != first
    finally:
        await engine.dispose()


async def test_a_connection_given_back_a_moment_ago_is_used_without_a_ping(make_settings, monkeypatch):
    settings = await make_settings()
    engine = make_engine(settings, pool_size=1)
    pings = 0
    real_ping = AsyncAdapt_asyncpg_connection.ping

    def counting_ping(self):
        nonlocal pings
        pings += 1
        return real_ping(self)

    monkeypatch.setattr(AsyncAdapt_asyncpg_connection, "ping", counting_ping)
    try:
        await _backend_pid(engine)
        for _ in range(5):
            await _backend_pid(engine)
        assert pings == 0
        monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.0)
        await _backend_pid(engine)
        assert pings == 1
    finally:
        await engine.dispose()


async def test_the_services_connections_run_without_jit(make_settings):
    engine = make_engine(await make_settings(), pool_size=1)
    try:
        async with transaction(engine) as conn:
            assert (await conn.execute(text("SHOW jit"))).scalar_one() == "off"
    finally:
        await engine.dispose()


async def test_a_statement_past_the_command_timeout_fails_as_transient_instead_of_hanging(make_settings):
    """The gateway's engine is bounded like its requests: a database that hangs (frozen,
    or a lock held) makes a TransientError (a 503), and the pool goes on serving."""
    settings = await make_settings()
    engine = make_engine(settings, pool_size=1, command_timeout_s=0.3)
    try:
        with pytest.raises(TransientError):
            async with transaction(engine) as conn:
                await conn.execute(text("SELECT pg_sleep(30)"))
        assert await _backend_pid(engine)  # and the next statement is served
    finally:
        await engine.dispose()


async def test_a_wait_for_a_pooled_connection_past_the_timeout_fails_as_transient(make_settings):
    """Every connection busy (a frozen database holds them all): the next request is a 503
    within the timeout, not a 500 from the pool's own TimeoutError."""
    settings = await make_settings()
    engine = make_engine(settings, pool_size=1, command_timeout_s=0.3)  # 1 + 1 overflow
    try:
        async with engine.connect() as first, engine.connect() as second:
            assert first is not second
            with pytest.raises(TransientError):
                async with transaction(engine):
                    pass
    finally:
        await engine.dispose()


async def test_a_statement_prepared_before_a_migration_changed_its_table_is_transient_and_works_again(make_settings):
    """`redrive migrate` under running services (compose does it on deploy): a cached
    ``SELECT *`` meets the new column. One request fails as retryable (a 503, a nak), the
    next works: the driver has dropped its statements."""
    from shared.errors import classify

    settings = await make_settings()
    engine = make_engine(settings, pool_size=1)
    try:
        async with transaction(engine) as conn:
            await conn.execute(text("CREATE TABLE migrated (id int)"))
        for _ in range(2):  # prepared and cached
            async with transaction(engine) as conn:
                await conn.execute(text("SELECT * FROM migrated"))
        admin = await asyncpg.connect(settings.database_url)
        try:
            await admin.execute("ALTER TABLE migrated ADD COLUMN added int")
        finally:
            await admin.close()
        with pytest.raises(Exception) as failed:
            async with transaction(engine) as conn:
                await conn.execute(text("SELECT * FROM migrated"))
        # The database layer says so itself (what consumers decide a nak by), and anything
        # that classifies the error agrees.
        assert isinstance(failed.value, TransientError), repr(failed.value)
        assert classify(failed.value).transient
        async with transaction(engine) as conn:
            assert list((await conn.execute(text("SELECT * FROM migrated"))).keys()) == ["id", "added"]
    finally:
        await engine.dispose()


async def test_waiting_for_a_runs_claim_puts_the_lock_timeout_back_as_it_was(make_settings):
    from services.coordinator import store

    settings = await make_settings()
    engine = make_engine(settings, pool_size=1)
    try:
        async with transaction(engine) as conn:
            await conn.execute(text("SET LOCAL lock_timeout = '7s'"))
            await store._await_claim(conn, "some-run", 0.5)
            assert (await conn.execute(text("SHOW lock_timeout"))).scalar_one() == "7s"
    finally:
        await engine.dispose()
