"""File events applied by the coordinator, sent by hand (no executor): what one batch of
several events about the same file leaves behind."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from shared import bus
from shared.messages import FileEvent, job_id_for
from tests.stack import Stack


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
