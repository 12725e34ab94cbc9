"""Automatic retries are budgeted per step (seed 000: "a workflow step fails … retries up
to 3 times"): a step that checkpoints hands the next step a fresh budget, and a step's own
``auto_retries`` limits that step alone. Over the real services, both ways a retried job
comes back: nak with a delay, and (near the consumer's max deliver) re-published."""

from __future__ import annotations

import pytest

from tests.integration import handlers_that_count
from tests.stack import Stack

# No jitter: each retry's delay is the exact ceiling for its attempt number.
POLICY = dict(auto_retries=2, backoff_base_ms=10, backoff_max_ms=400, jitter=False, breaker_failure_threshold=50,
              breaker_reset_s=1)


@pytest.fixture(scope="module", params=[20, 3], ids=["nak", "republish"])
async def stack(make_settings, request):
    # max deliver 3: every retry after the first re-publishes the job (job_runner._come_back_later).
    settings = await make_settings(handlers="tests.integration.handlers_that_count", executor_max_deliver=request.param)
    s = await Stack(settings).start("billing", "coordinator", "executor")
    yield s
    await s.stop()


async def tenant_with(stack: Stack, **settings) -> str:
    tenant = await stack.tenant()
    await stack.call("coordinator", "put_settings", tenant_id=tenant, **{**POLICY, **settings})
    return tenant


def fails_first(name: str, calls: int, **step) -> dict:
    return {"name": name, "handler": "fails_first", "params": {"calls": calls}, **step}


async def timeline(stack: Stack, tenant: str, run_id: str, kind: str) -> list[tuple[int, int, int]]:
    """(file, step, attempt) of each ``kind`` entry, in order."""
    items = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run_id))["items"]
    return sorted((e["file_index"], e["details"]["step"], e["details"]["attempt"]) for e in items if e["kind"] == kind)


def attempts_seen(job_id: str, file_index: int, step: int) -> list[int]:
    return handlers_that_count.attempts.get((job_id, file_index, step), [])


@pytest.mark.parametrize("mode", ["per_file", "batch"])
async def test_each_step_gets_its_own_retry_budget(stack, mode):
    tenant = await tenant_with(stack)  # 2 automatic retries
    template = await stack.template(tenant, [fails_first("a", 2), fails_first("b", 2)])
    run = await stack.submit(tenant, template, 2, mode=mode)
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED", done["files"]
    for f in done["files"]:
        assert (f["status"], f["attempts"], f["output"]) == ("SUCCEEDED", 3, {"calls": 3, "attempt": 3})
    retried = await timeline(stack, tenant, run["id"], "file_retrying")
    assert retried == [(i, step, n) for i in (0, 1) for step in (0, 1) for n in (1, 2)]
    items = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
    # The second step's retries start over on the backoff schedule too: 10 ms, then 20.
    assert sorted((e["details"]["step"], e["details"]["next_delay_ms"]) for e in items
                  if e["kind"] == "file_retrying" and e["file_index"] == 0) == [(0, 10), (0, 20), (1, 10), (1, 20)]
    job_id = f"{run['id']}:batch:r0" if mode == "batch" else f"{run['id']}:file:0:r0"
    assert attempts_seen(job_id, 0, 0) == attempts_seen(job_id, 0, 1) == [1, 2, 3]


@pytest.mark.parametrize("mode", ["per_file", "batch"])
async def test_a_step_failing_past_its_budget_fails_the_file_after_exactly_its_attempts(stack, mode):
    tenant = await tenant_with(stack)
    template = await stack.template(tenant, [fails_first("a", 2), fails_first("b", 99)])
    run = await stack.submit(tenant, template, 1, mode=mode)
    done = await stack.wait_run(tenant, run["id"])
    [f] = done["files"]
    assert (f["status"], f["attempts"], f["checkpoint_step"]) == ("FAILED", 3, 0)
    assert f["last_error"]["transient"] is True and "call 3 of step 1" in f["last_error"]["message"]
    assert await timeline(stack, tenant, run["id"], "file_retrying") == [(0, 0, 1), (0, 0, 2), (0, 1, 1), (0, 1, 2)]
    assert await timeline(stack, tenant, run["id"], "file_failed") == [(0, 1, 3)]
    job_id = f"{run['id']}:batch:r0" if mode == "batch" else f"{run['id']}:file:0:r0"
    assert attempts_seen(job_id, 0, 1) == [1, 2, 3]  # three attempts of that step, not one more


async def test_a_steps_own_limit_applies_to_that_step_alone(stack):
    tenant = await tenant_with(stack, auto_retries=3)
    template = await stack.template(tenant, [fails_first("a", 1, auto_retries=1), fails_first("b", 1, auto_retries=1),
                                             fails_first("c", 3)])
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"])
    assert done["files"][0]["status"] == "SUCCEEDED", done["files"]
    assert await timeline(stack, tenant, run["id"], "file_retrying") == [
        (0, 0, 1), (0, 1, 1), (0, 2, 1), (0, 2, 2), (0, 2, 3)]

    strict = await stack.template(tenant, [fails_first("a", 3), fails_first("b", 2, auto_retries=1)])
    run = await stack.submit(tenant, strict, 1)
    done = await stack.wait_run(tenant, run["id"])
    [f] = done["files"]
    assert (f["status"], f["attempts"], f["checkpoint_step"]) == ("FAILED", 4, 0)
    assert await timeline(stack, tenant, run["id"], "file_failed") == [(0, 1, 2)]


async def test_continue_starts_the_failed_step_with_a_fresh_budget(stack):
    tenant = await tenant_with(stack)
    # Step b fails 4 calls: its 3 attempts of round 0 are spent; round 1 succeeds at its 2nd.
    template = await stack.template(tenant, [fails_first("a", 0), fails_first("b", 4)])
    run = await stack.submit(tenant, template, 1)
    done = await stack.wait_run(tenant, run["id"])
    assert done["files"][0]["status"] == "FAILED"
    await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"])
    done = await stack.wait_run(tenant, run["id"])
    [f] = done["files"]
    assert (f["status"], f["retry_attempt"], f["attempts"]) == ("SUCCEEDED", 1, 2)
    assert attempts_seen(f"{run['id']}:file:0:r1", 0, 1) == [1, 2]
