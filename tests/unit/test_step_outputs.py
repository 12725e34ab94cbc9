"""A step's output must be JSON and fit in a message: otherwise the file is ERROR at once
(it would fail to publish on every delivery), and the steps after it do not run."""

from __future__ import annotations

import pytest

from shared.messages import FileSpec, Job, StepSpec
from services.executor.handlers.registry import HandlerRegistry
from services.executor.steps import StepRunner


def _job(*handlers: str) -> Job:
    return Job(job_id="r:file:0:r0", run_id="r", tenant_id="t", template_id="tpl", round=0, idempotency_key="k",
               files=[FileSpec(index=0, name="a.txt")],
               steps=[StepSpec(name=f"s{i}", handler=h) for i, h in enumerate(handlers)])


async def _run(tmp_path, job: Job, registry: HandlerRegistry, checkpoints: list) -> object:
    async def beat() -> None:
        pass

    async def on_checkpoint(step: int, output: dict) -> None:
        checkpoints.append(step)

    runner = StepRunner(registry, None, tmp_path, max_payload=64 * 1024)
    return await runner.run_file(job, job.files[0], attempt=1, start_step=0, previous_output=None,
                                 heartbeat=beat, on_checkpoint=on_checkpoint)


@pytest.mark.parametrize("output, says", [
    ({"when": {1, 2}}, "returned output that is not JSON"),
    ({"text": "x" * 100_000}, "bytes of output; at most 61440 fit in a message"),
])
async def test_an_output_that_cannot_travel_is_an_error_of_its_step(tmp_path, output, says):
    registry, later = HandlerRegistry(), []

    async def produce(ctx):
        return output

    async def after(ctx):
        later.append(ctx.step_index)
        return {}

    registry.register("produce", produce)
    registry.register("after", after)
    checkpoints: list = []
    outcome = await _run(tmp_path, _job("produce", "after"), registry, checkpoints)
    assert outcome.kind == "errored" and outcome.step == 0
    assert outcome.error.error_class == "InvalidOutput" and not outcome.error.transient
    assert says in outcome.error.message and "'s0'" in outcome.error.message
    assert checkpoints == [] and later == []


async def test_an_output_that_fits_goes_on(tmp_path):
    registry = HandlerRegistry()

    async def produce(ctx):
        return {"text": "x" * 50_000}

    registry.register("produce", produce)
    checkpoints: list = []
    outcome = await _run(tmp_path, _job("produce", "produce"), registry, checkpoints)
    assert outcome.kind == "succeeded" and checkpoints == [0] and len(outcome.output["text"]) == 50_000


class _Breakers:
    """Enough of the executor's BreakerBoard to see what a step reports about its dependency."""

    def __init__(self) -> None:
        self.reports: list[str] = []

    def admit(self, tenant_id, dependency):
        from shared.breaker import Admission

        return Admission("run")

    async def record_success(self, tenant_id, dependency):
        self.reports.append("success")

    async def record_failure(self, tenant_id, dependency, threshold, reset_s):
        self.reports.append("failure")


@pytest.mark.parametrize("raised, report", [("transient", "failure"), ("permanent", "success")])
async def test_a_dependency_that_answers_with_a_permanent_error_is_up(tmp_path, raised, report):
    # A half-open probe that ends in a 4xx must close the breaker, not leave it half-open
    # for the probe's whole lease while every other job waits.
    from shared.errors import PermanentError, TransientError

    registry, breakers = HandlerRegistry(), _Breakers()

    async def call(ctx):
        raise (TransientError if raised == "transient" else PermanentError)("HTTP 503" if raised == "transient" else "HTTP 404")

    registry.register("call", call, dependency_of=lambda params, file: "api.example")

    async def beat() -> None:
        pass

    async def on_checkpoint(step: int, output: dict) -> None:
        pass

    job = _job("call")
    await StepRunner(registry, breakers, tmp_path, max_payload=64 * 1024).run_file(
        job, job.files[0], attempt=1, start_step=0, previous_output=None, heartbeat=beat, on_checkpoint=on_checkpoint)
    assert breakers.reports == [report]


async def test_a_job_deferred_while_a_probe_is_out_comes_back_within_a_reset_period(tmp_path):
    # Half-open: the probe's lease is a minute, but the breaker may close any moment.
    from shared.breaker import Admission

    class ProbeOut(_Breakers):
        def admit(self, tenant_id, dependency):
            return Admission("defer", 60.0)

    registry = HandlerRegistry()

    async def call(ctx):
        return {}

    registry.register("call", call, dependency_of=lambda params, file: "api.example")

    async def beat() -> None:
        pass

    job = _job("call").model_copy(update={"retry": _job("call").retry.model_copy(update={"breaker_reset_s": 2})})
    outcome = await StepRunner(registry, ProbeOut(), tmp_path, max_payload=64 * 1024).run_file(
        job, job.files[0], attempt=1, start_step=0, previous_output=None, heartbeat=beat, on_checkpoint=None)
    assert outcome.kind == "defer" and outcome.dependency == "api.example"
    assert 2000 <= outcome.delay_ms <= 3000  # the reset period, plus up to half of it in jitter
