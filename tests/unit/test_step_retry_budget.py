"""The automatic retry budget is per step: what the executor remembers of it (Progress) and
the attempt number each step runs and is judged with (StepRunner)."""

from __future__ import annotations

from types import SimpleNamespace

import orjson

from shared.errors import TransientError
from shared.messages import FileSpec, Job, RetryPolicy, StepSpec
from services.executor.handlers.registry import HandlerRegistry
from services.executor.progress import Progress, ProgressStore, _merge
from services.executor.steps import StepRunner


def test_a_checkpoint_starts_the_next_steps_attempts_from_one():
    progress = Progress(failures=2)
    assert progress.attempt == 3
    progress.step, progress.failures_before_step = 0, progress.failures  # as job_runner's on_checkpoint
    assert progress.attempt == 1
    progress.failures += 1
    assert (progress.attempt, progress.explained) == (2, 3)  # deliveries we caused still count them all


async def test_a_record_written_before_per_step_budgets_still_loads():
    old = {"failures": 2, "deferrals": 1, "step": 0, "output": {"s": 0}, "done": False, "offset": 0,
           "not_before": None}
    store = ProgressStore(None, None)

    class KV:
        async def get(self, key):
            return SimpleNamespace(value=orjson.dumps(old), revision=1)

    store._kv = KV()
    loaded = await store.get("r:file:0:r0", 0)
    assert (loaded.failures, loaded.step, loaded.failures_before_step, loaded.attempt) == (2, 0, 0, 3)


def test_the_budget_base_is_merged_with_its_checkpoint():
    at_step_1 = Progress(failures=3, step=1, failures_before_step=3)
    stale = Progress(failures=4, step=0, failures_before_step=1)  # a slower delivery, one failure later
    merged = _merge(at_step_1, stale)
    assert (merged.failures, merged.step, merged.failures_before_step) == (4, 1, 3)
    assert _merge(stale, at_step_1).failures_before_step == 3
    assert _merge(Progress(failures=2, step=1, failures_before_step=1),
                  Progress(failures=2, step=1, failures_before_step=2)).failures_before_step == 2


async def test_a_step_reached_after_a_checkpoint_runs_and_is_judged_as_its_attempt_one(tmp_path):
    seen: list[tuple[int, int]] = []
    registry = HandlerRegistry()

    async def ok(ctx):
        seen.append((ctx.step_index, ctx.attempt))
        return {}

    async def fails(ctx):
        seen.append((ctx.step_index, ctx.attempt))
        raise TransientError("later")

    registry.register("ok", ok)
    registry.register("fails", fails)
    job = Job(job_id="r:file:0:r0", run_id="r", tenant_id="t", template_id="tpl", round=0, idempotency_key="k",
              files=[FileSpec(index=0, name="a.txt")], steps=[StepSpec(name="a", handler="ok"),
                                                              StepSpec(name="b", handler="fails")],
              retry=RetryPolicy(auto_retries=2, backoff_base_ms=100, backoff_max_ms=10_000, jitter=False))

    async def beat() -> None:
        pass

    async def on_checkpoint(step: int, output: dict) -> None:
        pass

    # Step a's third attempt succeeds; step b fails its first: retried, after the first backoff.
    outcome = await StepRunner(registry, None, tmp_path).run_file(
        job, job.files[0], attempt=3, start_step=0, previous_output=None, heartbeat=beat, on_checkpoint=on_checkpoint)
    assert seen == [(0, 3), (1, 1)]
    assert (outcome.kind, outcome.step, outcome.delay_ms) == ("retry", 1, 100)
