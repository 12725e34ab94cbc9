"""The `redrive` CLI against a real database: tenants, keys, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.subjects import Names


def redrive(settings, *args):
    env = {**os.environ, "NATS_URL": settings.nats_url, "DATABASE_URL": settings.database_url,
           "REDRIVE_DATA_DIR": str(settings.data_dir)}
    return subprocess.run([sys.executable, "-m", "redrive", *args], env=env, capture_output=True, text=True, timeout=60)


async def test_tenant_and_key_creation_and_usage_errors(make_settings):
    settings = await make_settings()
    made = redrive(settings, "tenant", "create", "acme", "--monthly-credits", "50", "--json")
    assert made.returncode == 0, made.stderr
    tenant = json.loads(made.stdout)["tenant_id"]
    key = redrive(settings, "key", "create", "--tenant", tenant, "--role", "member", "--json")
    assert key.returncode == 0 and json.loads(key.stdout)["key"].startswith("rk_")
    bad_role = redrive(settings, "key", "create", "--tenant", tenant, "--role", "king")
    assert bad_role.returncode == 2 and "Traceback" not in bad_role.stderr
    no_tenant = redrive(settings, "key", "create", "--tenant", "nope", "--role", "member")
    assert no_tenant.returncode == 1 and "no tenant nope" in no_tenant.stderr and "Traceback" not in no_tenant.stderr
    escape = redrive(settings, "key", "create", "--tenant", tenant, "--role", "member", "--user", "\x1b]0;x\x07ann")
    assert escape.returncode == 2 and "the user name must not contain control characters (U+001B at position 1)" \
        in escape.stderr, escape.stderr  # a usage error, as a bad tenant name or role
    empty = redrive(settings, "key", "create", "--tenant", tenant, "--role", "member", "--user", "")
    assert empty.returncode == 2 and "--user: the user name must not be empty" in empty.stderr, empty.stderr
    unknown = redrive(settings, "service", "nonsense")
    assert unknown.returncode == 2
    from services.billing.admin import open_account_direct

    balance = await open_account_direct(settings, tenant, 0, 0)  # idempotent: the CLI already opened it
    assert balance["monthly"]["allowance"] == 50


async def test_keys_are_listed_without_their_secret_and_revoked_by_id_or_by_the_key(make_settings):
    from services.gateway.identity import authenticate
    from shared.db import make_engine

    settings = await make_settings()
    tenant = json.loads(redrive(settings, "tenant", "create", "acme", "--json").stdout)["tenant_id"]
    made = [json.loads(redrive(settings, "key", "create", "--tenant", tenant, "--role", role, "--user", user,
                               "--json").stdout) for role, user in (("member", "ann"), ("tenant_admin", "bob"))]
    listed = json.loads(redrive(settings, "key", "list", "--tenant", tenant, "--json").stdout)
    assert {(k["id"], k["user"], k["role"], k["revoked_at"]) for k in listed} == {
        (made[0]["id"], "ann", "member", None), (made[1]["id"], "bob", "tenant_admin", None)}
    assert not any(m["key"] in json.dumps(listed) for m in made)  # never the key itself
    from datetime import datetime

    assert all(datetime.fromisoformat(k["created_at"]).tzinfo and "T" in k["created_at"] for k in listed)  # as the API
    table = redrive(settings, "key", "list", "--tenant", tenant)
    assert table.returncode == 0 and made[0]["id"] in table.stdout and "member" in table.stdout

    engine = make_engine(settings, pool_size=1)
    try:
        assert await authenticate(engine, made[0]["key"]) is not None
        by_id = redrive(settings, "key", "revoke", made[0]["id"])
        assert by_id.returncode == 0 and by_id.stdout.strip() == f"revoked {made[0]['id']}"
        by_key = redrive(settings, "key", "revoke", made[1]["key"], "--json")
        assert by_key.returncode == 0 and json.loads(by_key.stdout) == {"revoked": made[1]["id"]}
        assert await authenticate(engine, made[0]["key"]) is None and await authenticate(engine, made[1]["key"]) is None
    finally:
        await engine.dispose()
    again = redrive(settings, "key", "revoke", made[0]["id"])
    assert again.returncode == 1 and "no live key" in again.stderr and "Traceback" not in again.stderr
    assert all(k["revoked_at"] for k in json.loads(redrive(settings, "key", "list", "--tenant", tenant, "--json").stdout))


REPLICAS_REFUSED = "REDRIVE_STREAM_REPLICAS=3 needs a NATS cluster; this server is not clustered (use 1)"


async def test_stream_replicas_a_single_nats_server_cannot_hold_are_named(make_settings):
    """REDRIVE_STREAM_REPLICAS=3 against one nats-server: the message names that setting, not
    NATS_URL, whichever stream or key-value bucket the server refuses first, new or updated;
    and the service exits 2 (bad configuration) with that one line. (The tests' NATS is one
    server, tests/servers.py.)"""
    from redrive.cli_common import describe
    from services.coordinator.run_stops import ensure_bucket as ensure_run_stops_bucket
    from services.executor.breakers import BreakerBoard
    from services.executor.progress import ProgressStore
    from shared import bus, streams
    from shared.handler_offers import ensure_bucket as ensure_handlers_bucket
    from shared.settings import ConfigurationError
    from shared.subjects import Names

    settings = await make_settings(migrate=False, stream_replicas=3)
    names = Names(settings.prefix)
    nc = await bus.connect(settings, "test-replicas")
    try:
        js = nc.jetstream()
        declarations = {
            "streams": lambda: streams.ensure_streams(js, settings),
            "run stops": lambda: ensure_run_stops_bucket(js, names, 3),
            "handlers": lambda: ensure_handlers_bucket(js, names, 3),
            "progress": lambda: ProgressStore(js, names, 3).start(),
            "breakers": lambda: BreakerBoard(js, names, 3).start(),
        }
        for what, declare in declarations.items():
            with pytest.raises(ConfigurationError) as refused:
                await declare()
            assert describe(refused.value) == REPLICAS_REFUSED, what
        await streams.ensure_streams(js, settings.model_copy(update={"stream_replicas": 1}))  # exist: now an update
        version = nc.connected_server_version
        if (version.major, version.minor) >= (2, 10):  # NATS 2.9 takes such an update without a word
            with pytest.raises(ConfigurationError) as refused:
                await streams.ensure_streams(js, settings)
            assert describe(refused.value) == REPLICAS_REFUSED
    finally:
        await nc.close()

    env = {**os.environ, "NATS_URL": settings.nats_url, "DATABASE_URL": settings.database_url,
           "REDRIVE_DATA_DIR": str(settings.data_dir), "REDRIVE_PREFIX": settings.prefix, "REDRIVE_STREAM_REPLICAS": "3"}
    service = subprocess.run([sys.executable, "-m", "redrive", "service", "coordinator"], env=env, capture_output=True,
                             text=True, timeout=60)
    assert service.returncode == 2, service.stderr
    assert service.stderr.strip().splitlines()[-1] == f"error: {REPLICAS_REFUSED}", service.stderr
    assert "NATS_URL" not in service.stderr and "Traceback" not in service.stderr


async def test_commands_given_only_the_data_dir_use_the_prefix_of_its_up(make_settings):
    """`redrive up` records its REDRIVE_PREFIX in runtime.json: `redrive inspect` with only
    REDRIVE_DATA_DIR looks at that stack's streams; REDRIVE_PREFIX, when set, still wins."""
    from redrive.supervisor import Stack
    from shared import bus, streams

    settings = await make_settings(migrate=False)
    nc = await bus.connect(settings, "test-prefix")
    try:
        await streams.ensure_streams(nc.jetstream(), settings)
    finally:
        await nc.close()
    Stack(settings).write_runtime("http://127.0.0.1:8080")  # as `redrive up` does, with its servers and prefix
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL", "REDRIVE_NATS_URL",
                                                           "REDRIVE_DATABASE_URL", "REDRIVE_PREFIX")}
    env["REDRIVE_DATA_DIR"] = str(settings.data_dir)

    def inspect(**extra) -> dict:
        seen = subprocess.run([sys.executable, "-m", "redrive", "inspect", "--json"], env=env | extra,
                              capture_output=True, text=True, timeout=60)
        assert seen.returncode == 0, seen.stderr
        return json.loads(seen.stdout)

    found = inspect()
    assert found["prefix"] == settings.prefix
    assert all("error" not in stream for stream in found["streams"].values()), found["streams"]  # its streams exist
    names = Names(settings.prefix)
    # What `nats stream info` shows of them, the advisories stream included (messaging.md).
    assert set(found["streams"]) == {names.jobs_stream, names.events_stream, names.advisories_stream}
    jobs = found["streams"][names.jobs_stream]
    assert jobs["retention"] == "workqueue" and jobs["storage"] == "file" and jobs["duplicate_window_s"] > 0
    assert jobs["subjects"] == [names.jobs_all] and jobs["messages"] == 0
    plain = subprocess.run([sys.executable, "-m", "redrive", "inspect"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert f"Stream {names.jobs_stream}  subjects {jobs['subjects'][0]}  workqueue, file" in plain.stdout
    assert inspect(NATS_URL=settings.nats_url)["prefix"] == settings.prefix  # the stack's NATS, named in the environment
    assert inspect(REDRIVE_PREFIX="other")["prefix"] == "other"
