"""The servers from the wheels really start, keep their data across restarts, and crash."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncpg
import nats
import pytest

from shared.embedded import PG_FALLBACK_ROOT, EmbeddedNats, EmbeddedPostgres, EmbeddedServerError


@pytest.fixture
def cleanup():
    """Servers to stop (or kill) and fallback cluster dirs to remove at test end."""
    servers: list = []
    yield servers
    for server in reversed(servers):
        try:
            server.stop()
        except Exception:
            server.kill()
    for server in servers:
        pgdata = getattr(server, "pgdata", None)
        if pgdata is not None and Path(pgdata).parent == PG_FALLBACK_ROOT:
            shutil.rmtree(pgdata, ignore_errors=True)


async def _connect_nats(url: str):
    return await nats.connect(url, connect_timeout=1, allow_reconnect=False, max_reconnect_attempts=1)


async def test_nats_stream_survives_restart_and_kill_stops_it(tmp_path, cleanup):
    server = EmbeddedNats(tmp_path)
    cleanup.append(server)
    server.start()
    assert server.running and server.pid
    url = server.url

    nc = await _connect_nats(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="EMB", subjects=["emb.>"])
        ack = await js.publish("emb.one", b"hello")
        assert ack.stream == "EMB"
    finally:
        await nc.close()

    server.restart()
    assert server.url == url  # same port after restart
    nc = await _connect_nats(url)
    try:
        info = await nc.jetstream().stream_info("EMB")
        assert info.state.messages == 1  # the file store kept it
    finally:
        await nc.close()
    assert (tmp_path / "nats").is_dir() and (tmp_path / "nats.log").exists()

    server.kill()
    assert not server.running
    with pytest.raises(Exception):
        await _connect_nats(url)


def test_nats_start_failure_reports_the_log(tmp_path, cleanup):
    server = EmbeddedNats(tmp_path, port=4999, host="203.0.113.1")  # TEST-NET-3: not an address of ours
    cleanup.append(server)
    with pytest.raises(EmbeddedServerError, match="did not start") as failed:
        server.start()
    assert "203.0.113.1" in str(failed.value)
    assert not server.running


async def test_postgres_keeps_data_across_instances_and_restarts_after_kill(tmp_path, cleanup):
    data_dir = tmp_path / "data"
    first = EmbeddedPostgres(data_dir)
    cleanup.append(first)
    await first.astart()
    assert first.running and first.pid
    url = first.url
    assert url.startswith("postgresql://postgres@127.0.0.1:") and url.endswith("/redrive")
    if first.user is not None:  # root: tmp_path sits under 0700 /tmp/pytest-of-root
        assert (data_dir / "postgres").is_symlink()
        assert first.pgdata.parent == PG_FALLBACK_ROOT

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        await conn.execute("INSERT INTO t VALUES (1, 'kept')")
    finally:
        await conn.close()
    first.stop()
    assert not first.running

    second = EmbeddedPostgres(data_dir)  # a new object finds the same cluster and port
    cleanup.append(second)
    assert second.url == url and second.pgdata == first.pgdata
    await second.astart()
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT v FROM t WHERE id = 1") == "kept"
    finally:
        await conn.close()

    second.kill()  # crash: postmaster.pid stays behind
    assert not second.running
    assert (second.pgdata / "postmaster.pid").exists()
    with pytest.raises((OSError, asyncpg.PostgresError)):
        await asyncpg.connect(url, timeout=2)

    await second.astart()  # stale pid removed, crash recovery
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT v FROM t WHERE id = 1") == "kept"
        admin = await asyncpg.connect(second.admin_url)
        await admin.close()
    finally:
        await conn.close()
