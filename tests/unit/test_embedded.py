"""The servers from the wheels really start, keep their data across restarts, and crash;
no one without the credentials kept in their data directory gets in."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
from pathlib import Path

import asyncpg
import nats
import psutil
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
    assert url.startswith(f"postgresql://postgres:{first.password}@127.0.0.1:") and url.endswith("/redrive")
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


def _private(path: Path) -> str:
    """The secret in ``path``, checked to be readable by its owner only."""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    return path.read_text().strip()


async def test_nats_refuses_a_client_without_the_token(tmp_path, cleanup):
    server = EmbeddedNats(tmp_path)
    cleanup.append(server)
    server.start()
    for anonymous in (f"nats://{server.host}:{server.port}", f"nats://not-the-token@{server.host}:{server.port}"):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _connect_nats(anonymous)
    nc = await _connect_nats(server.url)
    await nc.close()


async def test_nats_token_is_private_off_the_command_line_and_kept_across_restarts(tmp_path, cleanup):
    server = EmbeddedNats(tmp_path)
    cleanup.append(server)
    server.start()
    token = _private(tmp_path / "nats.token")
    assert server.url == f"nats://{token}@127.0.0.1:{server.port}"
    assert token in _private(tmp_path / "nats.conf")
    assert not [arg for arg in psutil.Process(server.pid).cmdline() if token in arg]  # ps shows every argument
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1,
                            reconnected_cb=on_reconnect)
    try:
        sub = await nc.subscribe("emb.token")
        url = server.url
        await asyncio.to_thread(server.restart)
        assert server.url == url and _private(tmp_path / "nats.token") == token
        await asyncio.wait_for(reconnected.wait(), 10)  # the client sends the token again
        await nc.publish("emb.token", b"again")
        assert (await sub.next_msg(timeout=2)).data == b"again"
    finally:
        await nc.close()
    server.stop()

    again = EmbeddedNats(tmp_path, port=server.port)  # a later `redrive up` on the same data dir
    cleanup.append(again)
    again.start()
    assert again.url == url
    await (await _connect_nats(url)).close()


async def test_postgres_refuses_a_client_without_the_password(tmp_path, cleanup):
    server = EmbeddedPostgres(tmp_path / "data")
    cleanup.append(server)
    await server.astart()
    for anonymous in (f"postgresql://postgres@{server.host}:{server.port}/redrive",
                      f"postgresql://postgres:not-the-password@{server.host}:{server.port}/postgres"):
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
            await asyncpg.connect(anonymous, timeout=5)
    for url in (server.url, server.admin_url):
        conn = await asyncpg.connect(url, timeout=5)
        await conn.close()


async def test_postgres_password_is_private_and_kept_across_restarts(tmp_path, cleanup):
    data_dir = tmp_path / "data"
    server = EmbeddedPostgres(data_dir)
    cleanup.append(server)
    await server.astart()
    password = _private(data_dir / "postgres.password")
    url = server.url
    assert url == f"postgresql://postgres:{password}@127.0.0.1:{server.port}/redrive"
    await asyncio.to_thread(server.restart)
    assert server.url == url and _private(data_dir / "postgres.password") == password
    server.stop()

    again = EmbeddedPostgres(data_dir)
    cleanup.append(again)
    assert again.url == url
    await again.astart()
    conn = await asyncpg.connect(url, timeout=5)
    await conn.close()


def _cluster_of_an_earlier_version(server: EmbeddedPostgres) -> None:
    """initdb as redrive did before the embedded servers had credentials: trust, no password."""
    server.pgdata.mkdir(parents=True)
    if server.user is not None:
        os.chown(server.pgdata, server.user.pw_uid, server.user.pw_gid)
    server.pgdata.chmod(0o700)
    done = server._run("initdb", "-D", str(server.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                       "--locale=C", "--no-sync")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("left_running", [False, True], ids=["stopped", "left-running"])
async def test_postgres_cluster_of_an_earlier_version_is_secured_at_start(tmp_path, cleanup, left_running):
    data_dir = tmp_path / "data"
    server = EmbeddedPostgres(data_dir)
    cleanup.append(server)
    _cluster_of_an_earlier_version(server)
    anonymous = f"postgresql://postgres@{server.host}:{server.port}/postgres"
    if left_running:  # as a killed `redrive up` leaves it, for the next `up` to take over
        opts = f"-p {server.port} -h {server.host} -k ''"
        done = server._run("pg_ctl", "-D", str(server.pgdata), "-l", str(server.log_path), "-o", opts, "-w", "start")
        assert done.returncode == 0, done.stderr
        conn = await asyncpg.connect(anonymous, timeout=5)  # trust: anyone on the machine gets in
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('before')")
        await conn.close()
    assert not (data_dir / "postgres.password").exists()

    await server.astart()
    password = _private(data_dir / "postgres.password")
    assert password in server.url
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(anonymous, timeout=5)
    records = [line.split() for line in (server.pgdata / "pg_hba.conf").read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#")]
    assert records and all(record[-1] == "scram-sha-256" for record in records)
    conn = await asyncpg.connect(server.admin_url, timeout=5)
    try:
        if left_running:
            assert await conn.fetchval("SELECT v FROM kept") == "before"
    finally:
        await conn.close()

    # The next start finds it secured: same password, no second conversion.
    server.stop()
    again = EmbeddedPostgres(data_dir)
    cleanup.append(again)
    await again.astart()
    assert again.url == server.url and _private(data_dir / "postgres.password") == password
    conn = await asyncpg.connect(again.url, timeout=5)
    await conn.close()
