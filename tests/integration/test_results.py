"""File events applied by the coordinator, sent by hand (no executor): what one batch of
several events about the same file leaves behind."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import orjson
import pytest

from shared import bus
from shared.messages import FileEvent, job_id_for
from tests.stack import Stack, drained


@pytest.fixture(scope="module")
async def stack(make_settings):
    # A long gather: the events below are applied as one batch.
    s = await Stack(await make_settings(results_gather_ms=300)).start("billing", "coordinator")
    yield s
    await s.stop()


async def test_every_step_output_is_kept_when_a_files_events_arrive_in_one_batch(stack):
    tenant = await stack.tenant(monthly=100)
    template = await stack.template(tenant, [{"name": f"s{i}", "handler": "noop"} for i in range(3)])
    run = await stack.submit(tenant, template, 1)
    job_id = job_id_for(run["id"], 0, 0)
    events = [FileEvent(kind=kind, job_id=job_id, run_id=run["id"], tenant_id=tenant, file_index=0, round=0,
                        attempt=1, step=step, output={"step": step})
              for kind, step in (("checkpoint", 0), ("checkpoint", 1), ("succeeded", 2))]
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event(e.kind), e.to_bytes(), e.msg_id)
                                      for e in events])
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED" and done["counts"]["succeeded"] == 1
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        outputs = await conn.fetchval("SELECT step_outputs FROM coordinator.files WHERE run_id = $1", run["id"])
    finally:
        await conn.close()
    assert orjson.loads(outputs) == {"0": {"step": 0}, "1": {"step": 1}, "2": {"step": 2}}


async def test_an_event_that_can_never_apply_does_not_take_the_real_ones_message_id(stack):
    """The inbox recorded every event's id before the tenant and job checks: a garbled or
    forged event carrying the id of a file's real result made that result a "repeat"."""
    tenant, stranger = await stack.tenant(monthly=100), await stack.tenant(monthly=100)
    template = await stack.template(tenant, [{"name": "s", "handler": "noop"}])
    run = await stack.submit(tenant, template, 2)
    real = [FileEvent(kind="succeeded", job_id=job_id_for(run["id"], i, 0), run_id=run["id"], tenant_id=tenant,
                      file_index=i, round=0, attempt=1, step=0, output={"ok": i}) for i in range(2)]
    never = [
        real[0].model_copy(update={"tenant_id": stranger, "output": {"forged": True}}),  # another tenant's claim
        # Another file's job id under file 1 (same message id as file 0's real result).
        real[1].model_copy(update={"job_id": real[0].job_id, "kind": "errored"}),
    ]
    assert never[0].msg_id == real[0].msg_id and never[1].job_id == real[0].job_id
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event(e.kind), e.to_bytes(), f"never-{i}")
                                      for i, e in enumerate(never)])
    await drained(stack, stack.names.events_stream, stack.names.results_consumer)  # applied (or not) before
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event(e.kind), e.to_bytes(), e.msg_id)
                                      for e in real])
    done = await stack.wait_run(tenant, run["id"])
    assert (done["status"], done["counts"]["succeeded"]) == ("COMPLETED", 2)
    assert [f["output"] for f in done["files"]] == [{"ok": 0}, {"ok": 1}]


async def _inbox_ids(stack, prefix: str) -> list[str]:
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        return sorted(r[0] for r in await conn.fetch("SELECT msg_id FROM coordinator.inbox WHERE msg_id LIKE $1",
                                                     prefix + "%"))
    finally:
        await conn.close()


async def _remember(stack, prefix: str, **ages_days: int) -> None:
    """Inbox rows ``<prefix><label>-<i>`` received ``days`` ago, ``count`` of each: label=(days, count)."""
    conn = await asyncpg.connect(stack.settings.database_url)
    try:
        for label, (days, count) in ages_days.items():
            await conn.executemany(
                "INSERT INTO coordinator.inbox (msg_id, received_at) VALUES ($1, now() - make_interval(days => $2))",
                [(f"{prefix}{label}-{i:02}", days) for i in range(count)])
    finally:
        await conn.close()


async def test_the_inbox_forgets_ids_older_than_the_events_stream_keeps_a_batch_at_a_time(stack):
    from services.coordinator import inbox

    coordinator = stack.services["coordinator"][0]
    deadline = asyncio.get_running_loop().time() + 10
    while coordinator.sweeper.prune_passes < 1:  # its own first prune (at start) must not race ours
        assert asyncio.get_running_loop().time() < deadline, "the coordinator never pruned at start"
        await asyncio.sleep(0.02)
    prefix = f"prune-{uuid.uuid4().hex[:8]}-"
    await _remember(stack, prefix, old=(9, 25), week=(6, 3), fresh=(0, 3))
    engine = coordinator.engine
    # Only ids this test wrote are old enough; other tests' rows are fresh.
    assert await inbox.prune(engine, batch=10, max_batches=2) == (20, True)  # bounded pass: some left
    assert await inbox.prune(engine, batch=10, max_batches=2) == (5, False)
    left = await _inbox_ids(stack, prefix)
    assert left == sorted([f"{prefix}week-{i:02}" for i in range(3)] + [f"{prefix}fresh-{i:02}" for i in range(3)])


async def test_the_coordinator_prunes_the_inbox_on_its_first_sweep(stack):
    from services.coordinator.recovery import RecoverySweeper

    prefix = f"sweep-{uuid.uuid4().hex[:8]}-"
    await _remember(stack, prefix, old=(9, 3), fresh=(0, 2))
    sweeper = RecoverySweeper(stack.services["coordinator"][0].deps)  # as a coordinator starting now
    sweeper.start()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while len(await _inbox_ids(stack, prefix)) != 2:
            assert asyncio.get_running_loop().time() < deadline, "the old ids were never pruned"
            await asyncio.sleep(0.05)
    finally:
        await sweeper.stop()
    assert await _inbox_ids(stack, prefix) == [f"{prefix}fresh-00", f"{prefix}fresh-01"]


async def test_a_poison_jobs_failure_is_the_step_after_the_files_checkpoint(stack):
    """The coordinator fails a poison job at the step it started at (it knows no more when
    the advisory comes); the file checkpointed step 0, so the step that killed its executor
    was step 1. Recorded at 0, an optional step 1 could not be skipped (and a Skip of an
    optional step 0 would have run step 1 again, into the crash)."""
    tenant = await stack.tenant(monthly=100)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}, {"name": "b", "handler": "noop",
                                                                                "optional": True}])
    run = await stack.submit(tenant, template, 1)
    job_id = job_id_for(run["id"], 0, 0)
    checkpoint = FileEvent(kind="checkpoint", job_id=job_id, run_id=run["id"], tenant_id=tenant, file_index=0,
                           round=0, attempt=1, step=0, output={})
    poison = FileEvent.model_validate({"kind": "failed", "job_id": job_id, "run_id": run["id"], "tenant_id": tenant,
                                       "file_index": 0, "round": 0, "attempt": 5, "step": 0,
                                       "error": {"class": "PoisonJob", "message": "died", "transient": True}})
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event(e.kind), e.to_bytes(), msg_id)
                                      for e, msg_id in ((checkpoint, checkpoint.msg_id), (poison, f"{job_id}:0:poison"))])
    done = await stack.wait_run(tenant, run["id"])
    assert done["files"][0]["status"] == "FAILED" and done["files"][0]["skippable"]  # its optional step b
    skipped = await stack.call("coordinator", "skip_file", tenant_id=tenant, run_id=run["id"], file_index=0)
    assert skipped["files"][0]["status"] == "SKIPPED"


async def test_a_retry_recorded_after_its_run_was_flagged_breaker_open_does_not_clear_the_flag(stack):
    """A job that failed just before the breaker opened is recorded after the run was
    flagged: it cleared the flag for good (the deferral is told once per open period), and
    the run's waiting jobs then held its tenant's window, so that no other run of the
    tenant started (test_fair_share failed so under load). A finished file clears it."""
    tenant = await stack.tenant(monthly=100)
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = await stack.submit(tenant, template, 3)  # file 2 keeps it RUNNING
    job_id = job_id_for(run["id"], 0, 0)
    common = dict(job_id=job_id, run_id=run["id"], tenant_id=tenant, file_index=0, round=0, step=0)
    deferred = FileEvent(kind="deferred", attempt=1, dependency="down.example", next_delay_ms=60_000, **common)
    retrying = FileEvent.model_validate({**common, "kind": "retrying", "attempt": 1, "next_delay_ms": 100,
                                         "error": {"class": "TransientError", "message": "down", "transient": True}})
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event("deferred"), deferred.to_bytes(),
                                                   f"{run['id']}:deferred:down.example:1")])
    await stack.wait_run(tenant, run["id"], until=lambda r: r.get("attention_reason") == "breaker_open")
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event("retrying"), retrying.to_bytes(),
                                                   retrying.msg_id)])
    await stack.wait_run(tenant, run["id"], until=lambda r: r["files"][0]["attempts"] == 1)  # the retry was applied
    assert (await stack.run(tenant, run["id"]))["attention_reason"] == "breaker_open"
    # Nor does the failure that opened the breaker, recorded late too.
    failed = FileEvent.model_validate({**common, "kind": "failed", "attempt": 2,
                                       "error": {"class": "TransientError", "message": "down", "transient": True}})
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event("failed"), failed.to_bytes(), failed.msg_id)])
    flagged = await stack.wait_run(tenant, run["id"], until=lambda r: r["counts"]["failed"] == 1)
    assert flagged["attention_reason"] == "breaker_open"
    succeeded = FileEvent(kind="succeeded", attempt=2, output={}, **{**common, "file_index": 1,
                                                                     "job_id": job_id_for(run["id"], 1, 0)})
    await bus.publish_many(stack.js, [bus.Outgoing(stack.names.file_event("succeeded"), succeeded.to_bytes(),
                                                   succeeded.msg_id)])
    cleared = await stack.wait_run(tenant, run["id"], until=lambda r: r["counts"]["succeeded"] == 1)
    assert cleared["attention_reason"] is None and not cleared["needs_attention"]


async def test_a_deferral_applied_with_its_files_result_does_not_flag_the_run(stack):
    """The deferral and the file's success in one results batch: the run was flagged
    breaker_open with nothing waiting, and a flagged run publishes no more of its jobs."""
    tenant = await stack.tenant(monthly=100)
    run = await stack.submit(tenant, await stack.template(tenant, [{"name": "a", "handler": "noop"}]), 2)
    common = dict(job_id=job_id_for(run["id"], 0, 0), run_id=run["id"], tenant_id=tenant, file_index=0, round=0,
                  step=0)
    deferred = FileEvent(kind="deferred", attempt=1, dependency="down.example", next_delay_ms=60_000, **common)
    succeeded = FileEvent(kind="succeeded", attempt=1, output={}, **common)
    await bus.publish_many(stack.js, [  # one batch: the gather window is 300 ms
        bus.Outgoing(stack.names.file_event("deferred"), deferred.to_bytes(), f"{run['id']}:deferred:down.example:1"),
        bus.Outgoing(stack.names.file_event("succeeded"), succeeded.to_bytes(), succeeded.msg_id)])
    done = await stack.wait_run(tenant, run["id"], until=lambda r: r["counts"]["succeeded"] == 1)
    timeline = await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"])
    assert "file_deferred" in [e["kind"] for e in timeline["items"]]  # the deferral was applied
    assert done["attention_reason"] is None and not done["needs_attention"]
