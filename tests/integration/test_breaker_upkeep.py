"""What one tenant can leave behind in the breakers bucket, against a real NATS: idle
breakers are forgotten (the bucket's TTL), open ones are kept while they matter, a tenant's
breakers are capped, a dependency's name cannot make a key NATS refuses, and the
``breakers`` verb's reply is bounded (the audit: 50 URL hosts made 50 breakers, never
removed; about 7,000 would have made the reply larger than NATS carries)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError

from services.executor import breakers as breakers_module
from services.executor.breakers import BreakerBoard
from shared import bus
from shared.subjects import Names
from tests.stack import Stack

TTL_S = 0.5


@pytest.fixture
async def nats_bus(make_settings):
    settings = await make_settings(migrate=False)
    nc = await bus.connect(settings, "test-breakers")
    yield nc, nc.jetstream(), Names(settings.prefix)
    await nc.close()


async def board(js, names: Names, **kw) -> BreakerBoard:
    made = BreakerBoard(js, names, **{"idle_ttl_s": TTL_S, **kw})
    await made.start()
    return made


async def stored(js, names: Names, tenant: str, dependency: str) -> bool:
    kv = await js.key_value(names.breakers_bucket)
    try:
        await kv.get(breakers_module._key(tenant, dependency))
        return True
    except KeyNotFoundError:
        return False


async def test_idle_closed_breakers_are_forgotten_and_an_open_one_is_kept(nats_bus):
    nc, js, names = nats_bus
    b = await board(js, names)
    try:
        await b.record_failure("t1", "counting", threshold=5, reset_s=30)  # closed, 1 failure
        await b.record_failure("t1", "recovered", threshold=5, reset_s=30)
        await b.record_success("t1", "recovered")  # closed, no failures
        await b.record_failure("t1", "down", threshold=1, reset_s=30)  # open for 30 s
        assert {x["dependency"] for x in b.snapshot()} == {"counting", "recovered", "down"}

        await asyncio.sleep(3 * TTL_S)
        assert [(x["dependency"], x["state"]) for x in b.snapshot()] == [("down", "open")]
        assert b.admit("t1", "down").verdict == "defer"
        assert b.admit("t1", "counting").verdict == "run"
        # Gone from the bucket too, not only from this process's copy: an executor starting
        # now knows the open breaker and nothing else.
        assert [await stored(js, names, "t1", d) for d in ("counting", "recovered", "down")] == [False, False, True]
        late = await board(js, names)
        try:
            assert [(x["dependency"], x["state"]) for x in late.snapshot()] == [("down", "open")]
        finally:
            await late.stop()
        # The failures a forgotten breaker counted are not counted on.
        await b.record_failure("t1", "counting", threshold=2, reset_s=30)
        assert [x["failures"] for x in b.snapshot("t1") if x["dependency"] == "counting"] == [1]
    finally:
        await b.stop()


async def test_an_open_breaker_is_let_go_once_its_probe_is_long_past(nats_bus, monkeypatch):
    # Kept until PROBE_GRACE_S past its probe time (the jobs it deferred have come back by
    # then): here, no grace at all, so it goes an idle TTL after its probe time.
    monkeypatch.setattr(breakers_module, "PROBE_GRACE_S", 0.0)
    nc, js, names = nats_bus
    b = await board(js, names)
    try:
        await b.record_failure("t1", "down", threshold=1, reset_s=1)
        await asyncio.sleep(1 + 3 * TTL_S)
        assert b.snapshot() == [] and not await stored(js, names, "t1", "down")
    finally:
        await b.stop()


async def test_a_bucket_made_without_a_ttl_takes_it(nats_bus):
    nc, js, names = nats_bus
    # As a release before this one made it.
    old = await js.create_key_value(KeyValueConfig(bucket=names.breakers_bucket, history=1, storage=StorageType.FILE))
    await old.put("t1/old", b'{"state": "closed", "failures": 1, "tenant_id": "t1", "dependency": "old"}')
    b = await board(js, names)
    try:
        assert (await js.stream_info(f"KV_{names.breakers_bucket}")).config.max_age == TTL_S
        assert [x["dependency"] for x in b.snapshot()] == ["old"]
        await asyncio.sleep(3 * TTL_S)
        assert b.snapshot() == [] and not await stored(js, names, "t1", "old")
    finally:
        await b.stop()


async def test_a_tenant_has_at_most_its_cap_of_breakers_that_count(nats_bus):
    nc, js, names = nats_bus
    b = await board(js, names, idle_ttl_s=60.0, max_per_tenant=3)
    try:
        await b.record_failure("t1", "fine", threshold=5, reset_s=30)
        await b.record_success("t1", "fine")  # closed with no failures: does not count
        for i in range(5):
            await b.record_failure("t1", f"host-{i}", threshold=1, reset_s=30)
        await b.record_failure("t2", "host-0", threshold=1, reset_s=30)  # another tenant's own cap
        assert sorted(x["dependency"] for x in b.snapshot("t1")) == ["fine", "host-0", "host-1", "host-2"]
        assert b.admit("t1", "host-4").verdict == "run"  # not counted: no breaker to hold it back
        assert [x["state"] for x in b.snapshot("t2")] == ["open"]
        # A breaker it has already goes on counting.
        await b.record_failure("t1", "fine", threshold=5, reset_s=30)
        assert [x["failures"] for x in b.snapshot("t1") if x["dependency"] == "fine"] == [1]
    finally:
        await b.stop()


async def test_a_dependency_name_longer_than_a_nats_subject_may_be_still_makes_a_breaker(nats_bus):
    nc, js, names = nats_bus
    b = await board(js, names, idle_ttl_s=60.0)
    long_a, long_b = "a" * 5000, "a" * 4999 + "b"
    try:
        await asyncio.wait_for(b.record_failure("t1", long_a, threshold=1, reset_s=30), 5)
        await asyncio.wait_for(b.record_failure("t1", long_b, threshold=5, reset_s=30), 5)
        assert nc.is_connected  # a key past NATS's control line would have closed it
        assert b.admit("t1", long_a).verdict == "defer" and b.admit("t1", long_b).verdict == "run"
        listed = b.snapshot("t1")
        assert [(x["state"], len(x["dependency"])) for x in listed] == [("open", 512), ("closed", 512)]
    finally:
        await b.stop()


@pytest.fixture(scope="module")
async def stack(make_settings):
    s = await Stack(await make_settings()).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


async def test_the_breakers_verb_lists_the_most_relevant_first_and_says_how_many_it_left_out(stack, monkeypatch):
    b: BreakerBoard = stack.services["executor"][0].breakers
    monkeypatch.setattr(b, "_max_listed", 3)
    noisy, quiet = await stack.tenant(), await stack.tenant()
    for i in range(6):  # closed, with 1..6 failures
        for _ in range(i + 1):
            await b.record_failure(noisy, f"host-{i}.example", threshold=100, reset_s=30)
    await b.record_failure(noisy, "down.example", threshold=1, reset_s=30)
    await b.record_failure(quiet, "q.example", threshold=100, reset_s=30)

    mine = await stack.call("executor", "breakers", tenant_id=noisy)
    assert [(x["dependency"], x["state"], x["failures"]) for x in mine] == [
        ("down.example", "open", 1), ("host-5.example", "closed", 6), ("host-4.example", "closed", 5)]
    assert {x["not_listed"] for x in mine} == {4}
    everyone = await stack.call("executor", "breakers")
    assert len(everyone) == 3 and {x["not_listed"] for x in everyone} == {len(b._local) - 3}
    theirs = await stack.call("executor", "breakers", tenant_id=quiet)
    assert [(x["dependency"], x["not_listed"]) for x in theirs] == [("q.example", 0)]


async def test_the_breakers_verb_reply_stays_within_its_byte_budget(stack, monkeypatch):
    b: BreakerBoard = stack.services["executor"][0].breakers
    monkeypatch.setattr(b, "_max_reply_bytes", 4096)
    tenant = await stack.tenant()
    for i in range(40):
        await b.record_failure(tenant, f"{i:03d}-" + "h" * 400, threshold=100, reset_s=30)
    started = time.perf_counter()
    listed = await stack.call("executor", "breakers", tenant_id=tenant)
    assert time.perf_counter() - started < 2
    assert 0 < len(listed) < 40 and {x["not_listed"] for x in listed} == {40 - len(listed)}
    assert len(orjson.dumps(listed)) <= 4096


async def test_a_probe_that_runs_long_keeps_its_lease_and_no_second_probe_goes_out(nats_bus, monkeypatch):
    """A dependency that hangs rather than refuses: its probe runs past the lease. While its
    step runs, the executor renews the lease, so no other job probes beside it; once it
    stops renewing (the probe ended, or its executor died), another may probe."""
    from shared import breaker

    monkeypatch.setattr(breaker, "PROBE_LEASE_S", 1.0)  # renewed every third of it
    nc, js, names = nats_bus
    # Two executors; breakers kept well past the test (the short idle TTL of the other tests
    # would let the bucket forget this one between two renewals on a loaded machine).
    a, b = await board(js, names, idle_ttl_s=30), await board(js, names, idle_ttl_s=30)
    try:
        await a.record_failure("t1", "slow.example", threshold=1, reset_s=0.05)
        while a.admit("t1", "slow.example").verdict != "probe":
            await asyncio.sleep(0.01)
        assert await a.claim_probe("t1", "slow.example")
        lease = a.hold_probe("t1", "slow.example")
        deadline = time.time() + 3 * breaker.PROBE_LEASE_S  # the probe runs three leases long
        while time.time() < deadline:
            assert not await b.claim_probe("t1", "slow.example"), "a second probe beside a running one"
            await asyncio.sleep(0.05)
        lease.cancel()
        claimed, until = False, time.time() + 10 * breaker.PROBE_LEASE_S  # its last lease runs out: the next job probes
        while not claimed and time.time() < until:
            claimed = await b.claim_probe("t1", "slow.example")
            await asyncio.sleep(0.02)
        kv = await js.key_value(names.breakers_bucket)
        assert claimed, (await kv.get(breakers_module._key("t1", "slow.example"))).value
    finally:
        await a.stop()
        await b.stop()


async def test_a_probe_whose_run_is_stopped_mid_step_is_given_back_at_once(nats_bus, tmp_path):
    """The probe's step ended "stopped" (its run was cancelled): the dependency told nothing,
    so the next job probes at once, not after the probe's lease (a minute)."""
    from shared.messages import FileSpec, Job, StepSpec
    from services.executor.handlers.registry import HandlerRegistry
    from services.executor.outcome import StepStopped
    from services.executor.steps import StepRunner

    nc, js, names = nats_bus
    a, b = await board(js, names, idle_ttl_s=30), await board(js, names, idle_ttl_s=30)
    registry = HandlerRegistry()

    async def calls_out(ctx):
        await ctx.heartbeat()

    registry.register("h", calls_out, dependency_of=lambda params, file: "api.example")
    job = Job(job_id="r:file:0:r0", run_id="r", tenant_id="t1", template_id="tpl", round=0, idempotency_key="k",
              files=[FileSpec(index=0, name="a.txt")], steps=[StepSpec(name="s", handler="h")])

    async def run_stopped() -> None:
        raise StepStopped()

    try:
        await a.record_failure("t1", "api.example", threshold=1, reset_s=0.05)
        while a.admit("t1", "api.example").verdict != "probe":
            await asyncio.sleep(0.01)
        outcome = await StepRunner(registry, a, tmp_path).run_file(
            job, job.files[0], attempt=1, start_step=0, previous_output=None, heartbeat=run_stopped,
            on_checkpoint=None)
        assert outcome.kind == "stopped"
        assert await b.claim_probe("t1", "api.example"), "the stopped probe still holds its lease"
    finally:
        await a.stop()
        await b.stop()
