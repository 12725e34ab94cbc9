"""Executor resilience over a real JetStream consumer: backoff, breakers, long steps."""

from __future__ import annotations

import asyncio
from datetime import datetime

import orjson
import pytest

from tests.stack import Stack


@pytest.fixture(scope="module")
async def stack(make_settings):
    # A short ack wait, so that a step of a few seconds outlives it several times; a low max
    # deliver, so that retries and breaker deferrals must not count towards it.
    s = await Stack(await make_settings(executor_ack_wait_s=1.0, executor_max_deliver=3)).start(
        "billing", "coordinator", "executor")
    yield s
    await s.stop()


class EventLog:
    """Every event of one run, as the executor published them (core subscription)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []

    async def attach(self, stack: Stack, pattern: str) -> "EventLog":
        async def on(msg):
            self.items.append((msg.subject.split(".events.", 1)[1], orjson.loads(msg.data)))

        self.sub = await stack.nc.subscribe(f"{stack.names.prefix}.events.{pattern}", cb=on)
        return self

    def of(self, kind: str, run_id: str | None = None) -> list[dict]:
        return [e for k, e in self.items if k == kind and (run_id is None or e.get("run_id") == run_id)]


async def tenant_with(stack: Stack, **settings) -> str:
    tenant = await stack.tenant()
    base = dict(auto_retries=3, backoff_base_ms=100, backoff_max_ms=400, jitter=True, breaker_failure_threshold=50,
                breaker_reset_s=1)
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **{**base, **settings})
    return tenant


async def test_retries_wait_at_least_the_announced_backoff_within_its_bounds(stack):
    tenant = await tenant_with(stack)
    events = await EventLog().attach(stack, "file.>")
    template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 3}}])
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"])
    assert done["files"][0]["attempts"] == 4
    retrying = sorted(events.of("file.retrying", run["id"]), key=lambda e: e["attempt"])
    final = events.of("file.succeeded", run["id"])[0]
    assert [e["attempt"] for e in retrying] == [1, 2, 3]
    for n, (event, following) in enumerate(zip(retrying, retrying[1:] + [final]), start=1):
        ceiling = min(400, 100 * 2 ** (n - 1))
        assert 0 <= event["next_delay_ms"] <= ceiling
        waited_ms = (datetime.fromisoformat(following["at"]) - datetime.fromisoformat(event["at"])).total_seconds() * 1000
        assert waited_ms >= event["next_delay_ms"] - 5  # redelivered no sooner than announced


async def test_breaker_opens_defers_without_spending_attempts_half_opens_and_closes(stack):
    tenant = await tenant_with(stack, breaker_failure_threshold=2, breaker_reset_s=1, auto_retries=4)
    events = await EventLog().attach(stack, ">")
    dep = f"dep-{tenant}"
    template = await stack.template(
        tenant, [{"name": "call", "handler": "flaky", "params": {"fail_attempts": 2, "dependency": dep}}])
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"], timeout=30)
    assert done["status"] == "COMPLETED"
    # Two failures opened the breaker; the wait for the probe was not an attempt.
    assert done["files"][0]["attempts"] == 3
    states = [e["state"] for k, e in events.items if k.startswith("breaker.") and e["dependency"] == dep]
    assert states == ["open", "half_open", "closed"]
    opened = next(e for k, e in events.items if k == "breaker.open" and e["dependency"] == dep)
    succeeded = events.of("file.succeeded", run["id"])[0]
    assert datetime.fromisoformat(succeeded["at"]) >= datetime.fromisoformat(opened["next_probe_at"])
    breakers = await stack.call("executor", "breakers")
    assert [b for b in breakers if b["dependency"] == dep][0]["state"] == "closed"


async def test_a_run_waiting_for_an_open_breaker_is_listed_for_operators_until_it_moves(stack):
    tenant = await tenant_with(stack, breaker_failure_threshold=1, breaker_reset_s=3, auto_retries=3)
    events = await EventLog().attach(stack, "file.deferred")
    dep = f"dep-{tenant}"
    template = await stack.template(
        tenant, [{"name": "call", "handler": "flaky", "params": {"fail_attempts": 1, "dependency": dep}}])
    run = await stack.submit(tenant, template, 3)
    waiting = await stack.wait_run(tenant, run["id"], until=lambda r: r["attention_reason"] is not None, timeout=30)
    assert (waiting["status"], waiting["attention_reason"]) == ("RUNNING", "breaker_open")
    listed = await stack.call("coordinator", "attention", tenant_id=tenant)
    assert [(r["id"], r["reason"]) for r in listed["items"]] == [(run["id"], "breaker_open")]
    done = await stack.wait_run(tenant, run["id"], timeout=30)
    assert done["status"] == "COMPLETED" and not done["needs_attention"]
    # Told once per open period, not once per deferral of each file.
    told = events.of("file.deferred", run["id"])
    assert told and len({e["breaker_opened_at"] for e in told}) == len(told)
    assert all(e["dependency"] == dep and e["error"]["class"] == "DependencyUnavailable" for e in told)
    timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
    assert [e["details"]["dependency"] for e in timeline if e["kind"] == "file_deferred"] == [dep] * len(told)


async def test_one_tenants_failures_never_open_another_tenants_breaker(stack):
    # Per tenant: its own threshold and reset time apply, and a dependency's limits are often
    # per tenant too (an API key rate-limited with 429s).
    noisy = await tenant_with(stack, breaker_failure_threshold=1, breaker_reset_s=30, auto_retries=1)
    quiet = await tenant_with(stack, breaker_failure_threshold=1, breaker_reset_s=30)
    dep = f"shared-{noisy}"
    failing = await stack.template(noisy, [{"name": "call", "handler": "flaky",
                                            "params": {"fail_attempts": 9, "dependency": dep}}])
    run = await stack.submit(noisy, failing, 1)
    await stack.wait_run(noisy, run["id"], until=lambda r: r["attention_reason"] == "breaker_open")
    working = await stack.template(quiet, [{"name": "call", "handler": "flaky", "params": {"dependency": dep}}])
    other = await stack.submit(quiet, working, 2)
    done = await stack.wait_run(quiet, other["id"])  # not held back by the other tenant's open breaker
    assert done["status"] == "COMPLETED" and [f["attempts"] for f in done["files"]] == [1, 1]
    assert [(b["tenant_id"], b["state"]) for b in await stack.call("executor", "breakers", tenant_id=noisy)
            if b["dependency"] == dep] == [(noisy, "open")]
    assert [b["state"] for b in await stack.call("executor", "breakers", tenant_id=quiet) if b["dependency"] == dep] == []
    await stack.call("coordinator", "cancel", tenant_id=noisy, run_id=run["id"])


async def test_a_step_longer_than_the_ack_wait_is_not_redelivered_while_alive(stack):
    tenant = await tenant_with(stack)
    template = await stack.template(tenant, [{"name": "slow", "handler": "flaky", "params": {"sleep_ms": 3500}}])
    before = await stack.js.consumer_info(stack.names.jobs_stream, stack.names.executor_consumer)
    run = await stack.submit(tenant, template, 2)
    done = await stack.wait_run(tenant, run["id"], timeout=30)
    assert done["status"] == "COMPLETED" and [f["attempts"] for f in done["files"]] == [1, 1]
    after = await stack.js.consumer_info(stack.names.jobs_stream, stack.names.executor_consumer)
    assert after.num_redelivered == before.num_redelivered


async def test_a_step_past_its_timeout_is_cancelled_and_counts_as_transient(stack):
    tenant = await tenant_with(stack, auto_retries=1, backoff_base_ms=10, backoff_max_ms=20)
    template = await stack.template(
        tenant, [{"name": "stuck", "handler": "flaky", "timeout_s": 0.2, "params": {"sleep_ms": 5000}}])
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"], timeout=30)
    f = done["files"][0]
    assert f["status"] == "FAILED" and f["attempts"] == 2
    assert f["last_error"]["class"] == "StepTimeout" and f["last_error"]["transient"] is True


async def test_a_job_whose_ack_was_lost_is_acked_again_not_run_again_nor_a_suspect(stack, monkeypatch):
    """A NATS node failing over, or a connection dropping, loses acks: every job in flight
    comes back after the ack wait although this executor ran it and lived. Run again, each
    would repeat its work; taken for suspects (maybe poison), they ran one at a time."""
    from nats.aio.msg import Msg

    from services.executor.deliveries import deliveries

    tenant = await tenant_with(stack)
    events = await EventLog().attach(stack, "file.>")
    ack, lost, acked = Msg.ack, [], []

    async def first_acks_lost(msg: Msg) -> None:
        if msg.subject == stack.names.job(tenant):
            if deliveries(msg) == 1:
                lost.append(msg.reply)  # the ack never reaches the server
                return
            acked.append(deliveries(msg))
        await ack(msg)

    monkeypatch.setattr(Msg, "ack", first_acks_lost)
    template = await stack.template(tenant, [{"name": "s", "handler": "flaky", "params": {"sleep_ms": 50}}])
    run = await stack.submit(tenant, template, 4)
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED"
    deadline = asyncio.get_running_loop().time() + 20
    while len(acked) < 4 and asyncio.get_running_loop().time() < deadline:  # back after the ack wait
        await asyncio.sleep(0.05)
    assert len(lost) == 4 and acked == [2, 2, 2, 2]  # each came back once, and was acked then
    assert sorted(e["file_index"] for e in events.of("file.succeeded", run["id"])) == [0, 1, 2, 3]  # run once each
    assert stack.services["executor"][0].worker.cautious is False
