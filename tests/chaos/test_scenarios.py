"""Chaos: kill, stop and duplicate things under a multi-process redrive, then check that
nothing was lost, duplicated or charged twice (invariants.check), and report figures."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import orjson
import pytest
from aiohttp import web

from shared.bus import Outgoing, publish_many
from shared.messages import RetryPolicy
from services.coordinator.jobs import job_rows
from tests.chaos.conftest import FIGURES
from tests.chaos.invariants import check, wait_all_terminal
from tests.procs import ProcStack

pytestmark = pytest.mark.chaos

FILES = 30


async def start(settings, **kw) -> ProcStack:
    return await ProcStack(settings, **kw).start("billing", "coordinator", "notifier", "executor")


async def workload(stack: ProcStack, log, *, files=FILES, runs=2, sleep_ms=60, run_ids=None):
    tenant = await stack.tenant(monthly=10_000)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=5, backoff_base_ms=50,
                     backoff_max_ms=500, breaker_failure_threshold=5, breaker_reset_s=1)
    steps = [{"name": f"s{i}", "handler": "chaos_step", "params": {"log": str(log), "sleep_ms": sleep_ms}} for i in range(3)]
    template = await stack.template(tenant, steps)
    ids = []
    for i in range(runs):
        kw = {"run_id": run_ids[i]} if run_ids else {}
        ids.append((await stack.submit(tenant, template, files, **kw))["id"])
    return tenant, template, ids


async def some_progress(stack: ProcStack, tenant: str, run_id: str, at_least: int = 3) -> None:
    await stack.wait_run(tenant, run_id, until=lambda r: r["counts"]["succeeded"] >= at_least or r["status"] != "RUNNING")


async def finish(stack, name, tenant, ids, log, since):
    await wait_all_terminal(stack, tenant, ids)
    figures = await check(stack, tenant, ids, step_log=log)
    FIGURES.append({"scenario": name, **figures, "recovery_s": time.monotonic() - since})
    for run_id in ids:
        assert (await stack.run(tenant, run_id))["status"] == "COMPLETED"


async def test_executor_killed_mid_step(chaos_settings, tmp_path):
    stack = await start(await chaos_settings())
    try:
        log = tmp_path / "steps.log"
        tenant, _, ids = await workload(stack, log, sleep_ms=150)
        await some_progress(stack, tenant, ids[0])
        stack.kill("executor")
        await finish(stack, "kill -9 executor mid-step", tenant, ids, log, time.monotonic())
    finally:
        await stack.stop()


async def test_coordinator_killed_between_commit_and_publish(chaos_settings, tmp_path):
    marker = tmp_path / "crash"
    stack = await start(await chaos_settings(), env={"REDRIVE_CRASH_AT_BEFORE_PUBLISH": str(marker)})
    try:
        log = tmp_path / "steps.log"
        marker.touch()
        run_ids = [uuid.uuid4().hex, uuid.uuid4().hex]
        try:  # the reply may or may not leave before the relay's crash: the run ids are ours
            await workload(stack, log, run_ids=run_ids)
        except Exception:
            pass
        await stack.wait_services("coordinator")
        tenant = (await stack.rpc.call("coordinator", "list_runs", {}))["items"][0]["tenant_id"]
        since = time.monotonic()
        ids = [r["id"] for r in (await stack.call("coordinator", "list_runs", tenant_id=tenant))["items"]]
        assert not marker.exists() and stack.deaths.get("coordinator")
        await finish(stack, "kill -9 coordinator before publish", tenant, ids, log, since)
    finally:
        await stack.stop()


async def test_billing_and_notifier_killed_mid_run(chaos_settings, tmp_path):
    stack = await start(await chaos_settings())
    try:
        log = tmp_path / "steps.log"
        tenant, template, ids = await workload(stack, log)
        await some_progress(stack, tenant, ids[0])
        stack.kill("billing")
        stack.kill("notifier")
        since = time.monotonic()
        await stack.wait_services("billing", "notifier")
        ids.append((await stack.submit(tenant, template, 5))["id"])
        await finish(stack, "kill -9 billing and notifier", tenant, ids, log, since)

        async def completed_notes():
            return [n["run_id"] for n in (await stack.call("notifier", "list", tenant_id=tenant, limit=200))["items"]
                    if n["kind"] == "run_completed"]

        for _ in range(100):  # the notifier catches up after its restart
            if len(await completed_notes()) >= len(ids):
                break
            await asyncio.sleep(0.1)
        assert sorted(await completed_notes()) == sorted(ids)  # each exactly once
    finally:
        await stack.stop()


async def test_everything_killed_at_once_then_restarted(chaos_settings, tmp_path):
    stack = await start(await chaos_settings())
    try:
        log = tmp_path / "steps.log"
        tenant, _, ids = await workload(stack, log, sleep_ms=100)
        await some_progress(stack, tenant, ids[0])
        stack.kill_all()  # the watcher brings every service back
        since = time.monotonic()
        await stack.wait_services("billing", "coordinator", "notifier", "executor")
        await finish(stack, "kill -9 everything, restart", tenant, ids, log, since)
    finally:
        await stack.stop()


async def test_nats_server_restarted_mid_run(chaos_settings, chaos_servers, tmp_path):
    stack = await start(await chaos_settings())
    try:
        log = tmp_path / "steps.log"
        tenant, _, ids = await workload(stack, log)
        await some_progress(stack, tenant, ids[0])
        chaos_servers.nats.stop()
        await asyncio.sleep(1.0)  # an outage, not a blip
        chaos_servers.nats.start()
        await finish(stack, "nats-server stopped and restarted", tenant, ids, log, time.monotonic())
    finally:
        await stack.stop()


async def test_postgres_restarted_mid_run(chaos_settings, chaos_servers, tmp_path):
    stack = await start(await chaos_settings())
    try:
        log = tmp_path / "steps.log"
        tenant, _, ids = await workload(stack, log)
        await some_progress(stack, tenant, ids[0])
        chaos_servers.pg.stop()
        await asyncio.sleep(1.0)
        chaos_servers.pg.start()
        await finish(stack, "PostgreSQL stopped and restarted", tenant, ids, log, time.monotonic())
    finally:
        await stack.stop()


async def test_duplicate_job_and_event_deliveries(chaos_settings, tmp_path):
    settings = await chaos_settings()
    stack = await start(settings)
    try:
        log = tmp_path / "steps.log"
        events = []

        async def capture(msg):
            events.append(msg)

        await stack.nc.subscribe(f"{stack.names.prefix}.events.file.>", cb=capture)
        tenant, _, ids = await workload(stack, log, runs=1, sleep_ms=20)
        # Every job again, under new message ids (JetStream's dedupe cannot catch these).
        db = await asyncpg.connect(settings.database_url)
        run = dict(await db.fetchrow("SELECT * FROM coordinator.runs WHERE id = $1", ids[0]))
        template = dict(await db.fetchrow("SELECT * FROM coordinator.templates WHERE id = $1", run["template_id"]))
        template["steps"] = orjson.loads(template["steps"])
        files = [{"idx": r["idx"], "name": r["name"]} for r in await db.fetch("SELECT idx, name FROM coordinator.files WHERE run_id = $1", ids[0])]
        await db.close()
        rows = job_rows(stack.names, run, template, files, RetryPolicy(), msg_suffix=":dup")
        await publish_many(stack.js, [Outgoing(r["subject"], r["payload"], r["msg_id"]) for r in rows])
        await wait_all_terminal(stack, tenant, ids)
        # And every file event again, under new message ids: the coordinator's inbox knows them.
        await publish_many(stack.js, [Outgoing(m.subject, m.data, f"again-{i}") for i, m in enumerate(events)])
        await asyncio.sleep(1.0)  # give the coordinator time to (not) apply them
        run = await stack.run(tenant, ids[0])
        assert run["counts"]["succeeded"] == FILES and run["round"] == 0
        figures = await check(stack, tenant, ids)
        FIGURES.append({"scenario": "duplicate job and event deliveries", **figures, "recovery_s": 0.0})
    finally:
        await stack.stop()


async def test_acks_after_the_ack_wait_a_redelivered_job_finishes_twice(chaos_settings, tmp_path):
    settings = await chaos_settings(executor_ack_wait_s=1.0, executor_keepalive=False)
    stack = await ProcStack(settings, executors=2).start("billing", "coordinator", "notifier", "executor")
    try:
        log = tmp_path / "steps.log"
        redelivered = []

        async def watch_redeliveries():
            while True:
                info = await stack.js.consumer_info(stack.names.jobs_stream, stack.names.executor_consumer)
                redelivered.append(info.num_redelivered)
                await asyncio.sleep(0.1)

        watcher = asyncio.create_task(watch_redeliveries())
        tenant, _, ids = await workload(stack, log, files=6, runs=1, sleep_ms=700)
        await finish(stack, "late acks (job finished twice)", tenant, ids, log, time.monotonic())
        watcher.cancel()
        assert max(redelivered) > 0  # the scenario really happened: jobs were redelivered while still running
    finally:
        await stack.stop()


async def test_a_429_and_5xx_storm_from_a_dependency(chaos_settings, tmp_path):
    calls = {"n": 0}

    async def flaky_dependency(request: web.Request) -> web.Response:
        calls["n"] += 1
        # After the breaker opens (5 failures) it lets one probe through a reset period
        # (1 s): each failing call past the fifth is a second of the test.
        if calls["n"] <= 8:
            return web.Response(status=429, headers={"Retry-After": "0.2"})
        if calls["n"] <= 12:
            return web.Response(status=503)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/work", flaky_dependency)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    # The dependency listens on 127.0.0.1: the executor may call it as a single-tenant install would.
    stack = await start(await chaos_settings(executor_allow_private_urls=True))  # its dependency is local
    try:
        tenant = await stack.tenant(monthly=1000)
        await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=10, backoff_base_ms=50,
                         backoff_max_ms=400, breaker_failure_threshold=5, breaker_reset_s=1)
        template = await stack.template(tenant, [{"name": "call", "handler": "http_call",
                                                  "params": {"url": f"http://127.0.0.1:{port}/work"}}])
        since = time.monotonic()
        ids = [(await stack.submit(tenant, template, 20))["id"]]
        await wait_all_terminal(stack, tenant, ids)
        run = await stack.run(tenant, ids[0])
        assert run["status"] == "COMPLETED", [(f["attempts"], f["last_error"]) for f in run["files"] if f["status"] != "SUCCEEDED"]
        figures = await check(stack, tenant, ids)
        FIGURES.append({"scenario": "429/5xx storm", **figures, "recovery_s": time.monotonic() - since})
        breakers = await stack.call("executor", "breakers")
        assert [b["state"] for b in breakers if b["dependency"] == "127.0.0.1"] == ["closed"]
    finally:
        await stack.stop()
        await runner.cleanup()
