"""A URL no parser can read (an unclosed IPv6 bracket, a host that NFKC normalisation
changes) is the file's ERROR with its cause, from the handler's own check: never an
exception before the handler runs, which crashed every delivery of the job until it was
taken for poison (FAILED, and charged again by a Continue)."""

from __future__ import annotations

import pytest

from shared.errors import PermanentError
from shared.messages import FileSpec, Job, StepSpec
from services.executor.handlers import download, http_call
from services.executor.handlers.base import FileRef
from services.executor.handlers.registry import HandlerRegistry, builtin_registry
from services.executor.steps import StepRunner

MALFORMED = ["http://[::1/x", "http://a\u2100b.example/x"]


@pytest.mark.parametrize("url", MALFORMED)
def test_the_breakers_take_a_malformed_url_for_no_dependency(url):
    assert download.dependency_of({}, FileRef(name="a", url=url)) is None
    assert download.dependency_of({"url": url}, FileRef(name="a")) is None
    assert http_call.dependency_of({"url": url}, FileRef(name="a")) is None


@pytest.mark.parametrize("url", MALFORMED)
def test_a_template_whose_download_names_a_malformed_url_is_refused(url):
    problems = builtin_registry().check_steps([{"handler": "download", "params": {"url": url}}])
    assert problems["steps.0.params"].startswith("download: params.url must be an http(s) url")
    assert builtin_registry().check_steps([{"handler": "download", "params": {"url": "https://e.com/a"}}]) == {}


def _job(url: str) -> Job:
    return Job(job_id="r:file:0:r0", run_id="r", tenant_id="t", template_id="tpl", round=0, idempotency_key="k",
               files=[FileSpec(index=0, name="a.txt", url=url)], steps=[StepSpec(name="get", handler="download")])


async def _beat() -> None:
    pass


@pytest.mark.parametrize("url", MALFORMED)
async def test_a_file_with_a_malformed_url_is_an_error_naming_it(tmp_path, url):
    job = _job(url)
    outcome = await StepRunner(builtin_registry(), None, tmp_path).run_file(
        job, job.files[0], attempt=1, start_step=0, previous_output=None, heartbeat=_beat, on_checkpoint=None)
    assert outcome.kind == "errored" and not outcome.error.transient
    assert "download needs an http(s) url" in outcome.error.message


async def test_a_dependency_function_that_raises_leaves_the_step_to_its_handler(tmp_path):
    registry, ran = HandlerRegistry(), []

    def unreadable(params, file):
        raise ValueError("bad input")

    async def handler(ctx):
        ran.append(ctx.file.name)
        raise PermanentError("the handler says what is wrong")

    registry.register("h", handler, dependency_of=unreadable)
    job = _job("https://e.com/a").model_copy(update={"steps": [StepSpec(name="s", handler="h")]})
    outcome = await StepRunner(registry, None, tmp_path).run_file(
        job, job.files[0], attempt=1, start_step=0, previous_output=None, heartbeat=_beat, on_checkpoint=None)
    assert ran == ["a.txt"] and outcome.kind == "errored" and outcome.error.message == "the handler says what is wrong"
