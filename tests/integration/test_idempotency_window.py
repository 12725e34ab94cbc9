"""Idempotency-Key over the real services (api.md): the same key and body within 24 h is
the first request again, made and charged once, even when the gateway died between the
coordinator making the run and the answer being stored; a key used again after its window
is a new request, like a client's "nightly-import" every night, and makes and charges anew."""

from __future__ import annotations

import aiohttp
import pytest
from sqlalchemy import text

from shared.db import make_engine
from services.gateway import idempotency
from services.gateway.identity import create_key, create_tenant
from services.gateway.routes import request_id_for, run_id_for
from tests.stack import Stack

RUNS = "/api/v1/workflow-runs"


@pytest.fixture(scope="module")
async def env(make_settings):
    settings = await make_settings(port=0)
    stack = await Stack(settings).start("billing", "coordinator", "executor", "gateway")
    gateway = stack.services["gateway"][0]
    engine = make_engine(settings, pool_size=1)
    tenant = await create_tenant(engine, "acme")
    await stack.call("billing", "open_account", tenant_id=tenant, monthly_allowance=100)
    keys = {role: await create_key(engine, tenant, role, role) for role in ("member", "tenant_admin", "platform_admin")}
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http:
        yield {"http": http, "keys": keys, "tenant": tenant, "template": template, "stack": stack, "engine": engine,
               "lease_s": gateway.deps.idempotency_lease_s}
    await engine.dispose()
    await stack.stop()


def keyed(env, key: str, role: str = "member") -> dict:
    return {"Authorization": f"Bearer {env['keys'][role]}", "Idempotency-Key": key}


def run_body(env, *names: str) -> dict:
    return {"template_id": env["template"], "files": [{"name": n} for n in names]}


async def age(env, key: str, by_s: float = 25 * 3600) -> None:
    """What a day does to the gateway's record of a key (as the audit did by hand)."""
    async with env["engine"].begin() as conn:
        done = await conn.execute(text("UPDATE gateway.idempotency SET created_at = created_at - make_interval(secs => :by) "
                                       "WHERE tenant_id = :t AND key = :k"), {"by": by_s, "t": env["tenant"], "k": key})
        assert done.rowcount == 1


async def charges_of(env, run_id: str) -> list[int]:
    return [e["amount"] for e in await env["stack"].ledger(env["tenant"]) if e["run_id"] == run_id and e["kind"] == "charge"]


async def test_the_same_key_and_body_within_the_window_is_the_first_run_charged_once(env):
    http, body = env["http"], run_body(env, "a", "b")
    first = await http.post(RUNS, json=body, headers=keyed(env, "same-day"))
    again = await http.post(RUNS, json=body, headers=keyed(env, "same-day"))
    assert first.status == again.status == 201 and await first.json() == await again.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await charges_of(env, (await first.json())["id"]) == [-2]


async def test_the_same_key_after_its_window_with_another_body_is_a_new_run_charged_for_its_files(env):
    http, stack, tenant = env["http"], env["stack"], env["tenant"]
    monday = await http.post(RUNS, json=run_body(env, "mon-1", "mon-2"), headers=keyed(env, "nightly-import"))
    assert monday.status == 201
    monday = await monday.json()
    await age(env, "nightly-import")
    tuesday = await http.post(RUNS, json=run_body(env, "tue-1", "tue-2", "tue-3"), headers=keyed(env, "nightly-import"))
    assert tuesday.status == 201 and "Idempotent-Replayed" not in tuesday.headers
    tuesday = await tuesday.json()
    assert tuesday["id"] != monday["id"]
    run = await stack.run(tenant, tuesday["id"])
    assert [f["name"] for f in run["files"]] == ["tue-1", "tue-2", "tue-3"]
    assert await charges_of(env, tuesday["id"]) == [-3]
    assert await charges_of(env, monday["id"]) == [-2]  # the old run is left as it was
    # Within the new window the key names Tuesday's run; after it, the same body is a new run too.
    again = await http.post(RUNS, json=run_body(env, "tue-1", "tue-2", "tue-3"), headers=keyed(env, "nightly-import"))
    assert again.status == 201 and (await again.json())["id"] == tuesday["id"]
    await age(env, "nightly-import")
    wednesday = await http.post(RUNS, json=run_body(env, "tue-1", "tue-2", "tue-3"), headers=keyed(env, "nightly-import"))
    assert wednesday.status == 201 and (await wednesday.json())["id"] not in (monday["id"], tuesday["id"])
    assert await charges_of(env, (await wednesday.json())["id"]) == [-3]
    await stack.assert_books_balance(tenant)


async def test_a_run_made_by_a_gateway_that_died_before_storing_its_answer_is_found_by_a_retry(env):
    """The gateway claimed the key, the coordinator made and charged the run, then the
    gateway died: the retry must find that run, never make and charge a second."""
    http, stack, tenant, key = env["http"], env["stack"], env["tenant"], "died-mid-request"
    body = run_body(env, "x", "y")
    begun = await idempotency.begin(env["engine"], tenant, key, idempotency.request_hash("POST", RUNS, body),
                                    lease_s=env["lease_s"])
    assert begun.replay is None and not begun.taken_over
    run_id = run_id_for(tenant, key, begun.nonce)
    made = await stack.call("coordinator", "create_run", tenant_id=tenant, actor="member", run_id=run_id, **body)
    # …and the gateway is gone: no answer stored. While its lease runs, a retry waits its turn.
    early = await http.post(RUNS, json=body, headers=keyed(env, key))
    assert early.status == 409 and (await early.json())["error"]["code"] == "idempotency_in_progress"
    await age(env, key, 600)  # past the lease, well within the window
    retry = await http.post(RUNS, json=body, headers=keyed(env, key))
    assert retry.status == 201 and (await retry.json())["id"] == made["id"] == run_id
    replay = await http.post(RUNS, json=body, headers=keyed(env, key))
    assert replay.headers["Idempotent-Replayed"] == "true" and (await replay.json())["id"] == run_id
    assert await charges_of(env, run_id) == [-2]
    await stack.assert_books_balance(tenant)


async def test_a_continue_applied_by_a_gateway_that_died_is_not_applied_again_by_a_retry(env):
    """The coordinator applied (and charged) a keyed Continue, then the gateway died before
    storing its answer; the run's files failed again meanwhile, so another Continue would be
    allowed. The client's retry of the same request is answered with the run, not charged."""
    http, stack, tenant, key = env["http"], env["stack"], env["tenant"], "continue-once"
    template = await stack.template(tenant, [{"name": "s", "handler": "flaky", "params": {"fail_rounds": 2}}])
    run = await stack.submit(tenant, template, 1)
    assert (await stack.wait_run(tenant, run["id"]))["counts"]["failed"] == 1
    path = f"{RUNS}/{run['id']}/retry-failed"
    begun = await idempotency.begin(env["engine"], tenant, key, idempotency.request_hash("POST", path, None),
                                    lease_s=env["lease_s"])
    await stack.call("coordinator", "retry_failed", tenant_id=tenant, actor="tenant_admin", run_id=run["id"],
                     request_id=request_id_for("retry_failed", key, begun.nonce))
    # …and the gateway is gone. The Continue's round fails too: the run could be continued again.
    again = await stack.wait_run(tenant, run["id"], until=lambda r: r["status"] != "RUNNING" and r["round"] == 1)
    assert again["status"] == "COMPLETED_WITH_ERRORS" and again["counts"]["failed"] == 1
    await age(env, key, 600)  # past the lease
    retry = await http.post(path, headers=keyed(env, key, "tenant_admin"))
    assert retry.status == 200, await retry.text()
    assert (await retry.json())["round"] == 1  # the run as it is: not continued a second time
    assert await charges_of(env, run["id"]) == [-1, -1]  # the run, and the one Continue
    await stack.assert_books_balance(tenant)


async def test_a_grant_key_used_again_after_its_window_grants_again(env):
    http, tenant = env["http"], env["tenant"]
    path = f"/api/v1/admin/tenants/{tenant}/credits"
    before = (await (await http.get("/api/v1/credits", headers=keyed(env, "-", "platform_admin"))).json())
    start = before["purchased"]["remaining"]
    for _ in range(2):
        r = await http.post(path, json={"purchased": 5}, headers=keyed(env, "monthly-top-up", "platform_admin"))
        assert r.status == 200 and (await r.json())["purchased"]["remaining"] == start + 5  # once within the window
    await age(env, "monthly-top-up")
    r = await http.post(path, json={"purchased": 5}, headers=keyed(env, "monthly-top-up", "platform_admin"))
    assert r.status == 200 and (await r.json())["purchased"]["remaining"] == start + 10
    grants = [e for e in await env["stack"].ledger(tenant) if e["idempotency_key"].startswith("grant:monthly-top-up")]
    assert [e["amount"] for e in grants] == [5, 5] and len({e["idempotency_key"] for e in grants}) == 2


async def test_records_past_the_window_are_purged_a_batch_at_a_time_and_fresh_ones_kept(env):
    engine, tenant = env["engine"], env["tenant"]
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO gateway.idempotency (tenant_id, key, request_hash, state, created_at) "
            "SELECT :t, 'purge-' || g || CASE WHEN g <= 12 THEN '-old' ELSE '-fresh' END, 'h', 'done', "
            " CASE WHEN g <= 12 THEN now() - interval '25 hours' ELSE now() - interval '23 hours' END "
            "FROM generate_series(1, 14) g"), {"t": tenant})
    assert await idempotency.purge_expired(engine, batch=5) >= 12  # three batches (and any other test's expired)
    async with engine.connect() as conn:
        left = set((await conn.execute(text("SELECT key FROM gateway.idempotency WHERE key LIKE 'purge-%'"))).scalars())
    assert left == {"purge-13-fresh", "purge-14-fresh"}
