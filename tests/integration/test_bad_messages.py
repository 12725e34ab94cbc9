"""Malformed messages on every subject the services consume, published by hand: the service
keeps running, the good work around the bad message completes exactly, the bad message is
terminated (not redelivered forever) and a request gets an error reply, never a timeout.

The executor is started late (``executor`` fixture): until then the jobs that runs publish
stay in the stream, so the file events the coordinator applies are only the test's own.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import secrets
import time
import uuid

import orjson
import pytest

from services.billing.bootstrap import VERBS as BILLING_VERBS
from services.coordinator.endpoints import ROUTES as COORDINATOR_VERBS
from services.coordinator.run_events import file_failed_row
from services.notifier.handlers import VERBS as NOTIFIER_VERBS
from shared import streams
from shared.messages import ErrorInfo, FileEvent, RunEvent, ServiceError, job_id_for
from tests.stack import Stack, drained, expect_error

HUGE = 10**20  # past every integer column (int4 and int8), and past what orjson writes
BIG = 2**40  # past PostgreSQL integer, within bigint and JSON parsers


def dumps(value) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture(scope="module")
async def stack(make_settings):
    # A long gather, so that the good and bad events below are applied as one batch.
    s = await Stack(await make_settings(results_gather_ms=300)).start("billing", "coordinator", "notifier")
    yield s
    await s.stop()


@pytest.fixture(scope="module")
async def executor(stack):
    service = await importlib.import_module("services.executor.bootstrap").build(stack.settings)
    await service.start()
    stack.services.setdefault("executor", []).append(service)  # stopped (first) by stack.stop
    # A first job turns cautious mode off: later jobs run side by side.
    tenant = await stack.tenant()
    run = await stack.submit(tenant, await stack.template(tenant, [{"name": "a", "handler": "noop"}]), 1)
    await stack.wait_run(tenant, run["id"], timeout=15)
    return service


def run_id() -> str:
    return uuid.uuid4().hex


async def publish_raw(stack: Stack, subject: str, data: bytes, *, msg_id: str | None = None) -> None:
    """Publish with no headers at all, or only a Nats-Msg-Id."""
    await stack.js.publish(subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None)


# ---- (b) file events the coordinator applies ------------------------------------------------

def event(run: str, tenant: str, index: int, kind: str = "succeeded", **kw) -> dict:
    body = {"v": 1, "kind": kind, "job_id": job_id_for(run, index, 0), "run_id": run, "tenant_id": tenant,
            "file_index": index, "round": 0, "attempt": 1, "step": 0, "output": {"ok": True}}
    if kind in ("failed", "errored"):
        body["error"] = {"class": "Boom", "message": "it broke", "transient": kind == "failed"}
    return {**body, **kw}


async def test_bad_file_events_in_a_batch_are_dropped_and_the_good_ones_applied_exactly(stack):
    tenant, stranger = await stack.tenant(), await stack.tenant()
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = (await stack.submit(tenant, template, 6, run_id=run_id()))["id"]
    before = await stack.js.consumer_info(stack.names.events_stream, stack.names.results_consumer)

    good = {i: event(run, tenant, i) for i in range(5)}
    # A result whose error text carries a NUL (a handler's exception about binary data):
    # PostgreSQL refuses NUL in text and jsonb, but the result must not be lost for it.
    good[5] = event(run, tenant, 5, "failed", error={"class": "Boom", "message": "bad\x00byte", "transient": True})
    bad: list[tuple[str, bytes]] = [
        # First the ones about real files: each goes just before that file's good event.
        ("failed", dumps(event(run, stranger, 0, "failed"))),  # another tenant's claim on the run
        ("failed", dumps(event(run, tenant, 1, "failed", job_id=secrets.token_hex(6000)))),  # id past any index
        ("failed", dumps(event(run, tenant, 2, "failed", round=HUGE))),
        ("failed", dumps(event(run, tenant, 3, "failed", attempt=HUGE))),
        ("succeeded", dumps(event(run, tenant, 4, file_index="four"))),
        # A schema version this release does not know, claiming file 5 (which fails below).
        ("succeeded", dumps(event(run, tenant, 5, v=99, output={"forged": True}))),
        ("failed", dumps(event(run, tenant, 5, kind="exploded"))),
        ("succeeded", b""), ("succeeded", b"not json"), ("succeeded", b"[1, 2]"), ("failed", b'"failed"'),
        ("failed", b"null"), ("succeeded", dumps({"v": 1, "kind": "succeeded"})),
        ("failed", dumps(event(run, tenant, HUGE, "failed"))),
        ("failed", dumps(event(run, tenant, 99, "failed"))),  # no such file
        ("failed", dumps(event("no-such-run", tenant, 0, "failed"))),
        ("failed", dumps(event(run + "\x00", tenant, 1, "failed"))),
    ]
    # One burst: one batch holds them all.
    items: list[tuple[str, bytes]] = []
    for n, (kind, data) in enumerate(bad):
        items.append((kind, data))
        if n < len(good):
            e = FileEvent.model_validate(good[n])
            items.append((e.kind, e.to_bytes()))
    await asyncio.gather(*(publish_raw(stack, stack.names.file_event(kind), data) for kind, data in items))

    done = await stack.wait_run(tenant, run, timeout=15)
    assert done["status"] == "COMPLETED_WITH_ERRORS"
    counts = done["counts"]
    assert (counts["succeeded"], counts["failed"], counts["errored"], counts["pending"]) == (5, 1, 0, 0)
    files = {f["index"]: f for f in done["files"]}
    assert [files[i]["status"] for i in range(6)] == ["SUCCEEDED"] * 5 + ["FAILED"]
    assert files[0]["last_error"] is None and files[1]["last_error"] is None  # the stranger's and the long id's
    assert files[5]["last_error"]["message"] == "badbyte"
    info = await drained(stack, stack.names.events_stream, stack.names.results_consumer)
    assert info.num_redelivered == before.num_redelivered
    # Still applying: a later good event lands.
    again = (await stack.submit(tenant, template, 1))["id"]
    e = FileEvent.model_validate(event(again, tenant, 0))
    await publish_raw(stack, stack.names.file_event("succeeded"), e.to_bytes(), msg_id=e.msg_id)
    assert (await stack.wait_run(tenant, again, timeout=10))["status"] == "COMPLETED"


# ---- (c) events the notifier consumes --------------------------------------------------------

async def notifications(stack: Stack, tenant: str, until, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        items = (await stack.call("notifier", "list", tenant_id=tenant, limit=200))["items"]
        if until(items):
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"notifications of {tenant}: {items}")
        await asyncio.sleep(0.05)


async def test_a_late_failure_of_a_cancelled_file_notifies_nobody_and_a_real_one_does(stack):
    """An executor that finishes a file after its run was cancelled publishes its failure;
    the coordinator ignores it (the file is CANCELLED), and so must the notifications. Users
    were told "Step failed after multiple attempts" of CANCELLED files (by SSE and webhook
    too): the notifier read the executor's event, not what the coordinator applied."""
    tenant = await stack.tenant()
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    cancelled = (await stack.submit(tenant, template, 2, run_id=run_id()))["id"]
    await stack.call("coordinator", "cancel", tenant_id=tenant, actor="test", run_id=cancelled)
    live = (await stack.submit(tenant, template, 2, run_id=run_id()))["id"]
    for body in [event(cancelled, tenant, 0, "failed"), event(cancelled, tenant, 1, "failed"),
                 event(live, tenant, 0, "failed", step_name="a")]:  # the last, applied, is also the barrier
        await publish_raw(stack, stack.names.file_event("failed"), dumps(body),
                          msg_id=FileEvent.model_validate(body).msg_id)
    items = await notifications(stack, tenant, lambda items: any(i["kind"] == "file_failed" for i in items))
    assert [(i["run_id"], i["file_index"]) for i in items if i["kind"] == "file_failed"] == [(live, 0)]
    [note] = [i for i in items if i["kind"] == "file_failed"]
    assert note["message"] == "Step failed after multiple attempts (file 0, step 'a': it broke)"


async def test_bad_events_do_not_stop_the_notifier_or_hold_back_the_good_ones(stack):
    tenant = f"ten-{uuid.uuid4().hex[:8]}"
    run = run_id()
    executors = FileEvent(kind="failed", job_id=job_id_for(run, 1, 0), run_id=run, tenant_id=tenant, file_index=1,
                          round=0, attempt=4, step=0, step_name="ocr",
                          error=ErrorInfo.model_validate({"class": "Boom", "message": "bad\x00byte", "transient": True}))
    # What the notifier tells a file's failure from: the coordinator's run.file_failed.
    failed = RunEvent.from_bytes(file_failed_row(stack.names, {"id": run, "tenant_id": tenant, "status": "RUNNING"},
                                                 executors)["payload"])
    completed = RunEvent(kind="completed", run_id=run, tenant_id=tenant, round=0, status="COMPLETED",
                         counts={"total": 2, "succeeded": 2})
    file_failed, run_completed = stack.names.run_event("file_failed"), stack.names.run_event("completed")
    before = await stack.js.consumer_info(stack.names.events_stream, stack.names.notifier_consumer)
    items = [
        (file_failed, b""), (file_failed, b"not json"), (run_completed, b"[]"), (run_completed, b"null"),
        (run_completed, b'"completed"'), (run_completed, b'{"kind": "completed"}'),
        (file_failed, dumps({**orjson.loads(failed.to_bytes()), "file_index": "one"})),
        (file_failed, dumps({**orjson.loads(failed.to_bytes()), "file_index": HUGE})),
        (run_completed, dumps({**orjson.loads(completed.to_bytes()), "file_index": HUGE})),
        (run_completed, dumps({**orjson.loads(completed.to_bytes()), "tenant_id": "ten\x00ant"})),
        (stack.names.run_event("exploded"), completed.to_bytes()),  # a kind nobody is told about
        (file_failed, failed.to_bytes()),
        (run_completed, completed.to_bytes()),
    ]
    await asyncio.gather(*(publish_raw(stack, subject, data) for subject, data in items))
    got = await notifications(stack, tenant, lambda items: len(items) >= 2)
    assert sorted(i["kind"] for i in got) == ["file_failed", "run_completed"]
    assert "badbyte" in next(i["message"] for i in got if i["kind"] == "file_failed")
    info = await drained(stack, stack.names.events_stream, stack.names.notifier_consumer)
    assert info.num_redelivered == before.num_redelivered


# ---- (d) request / reply -------------------------------------------------------------------

async def raw_call(stack: Stack, service: str, verb: str, data: bytes) -> dict:
    msg = await stack.nc.request(stack.names.service(service, verb), data, timeout=5)  # a timeout fails the test
    return orjson.loads(msg.data)


ALL_VERBS = ([("coordinator", v) for v in COORDINATOR_VERBS] + [("billing", v) for v in BILLING_VERBS]
             + [("notifier", v) for v in NOTIFIER_VERBS])
MISTYPED = {"tenant_id": 5, "run_id": [], "template_id": {}, "file_index": "x", "amount": "lots", "idempotency_key": 7,
            "of_key": [], "purchased": "many", "monthly_allowance": "all", "id": None, "url": 3, "secret": 4,
            "limit": "ten", "cursor": 5, "steps": "s", "files": "f", "name": 1, "checkpoint_step": "last",
            "auto_retries": "some"}


async def test_every_verb_answers_a_malformed_body_with_an_error_reply(stack):
    for service, verb in ALL_VERBS:
        for data in (b"not json", b"{", b"[1]", b'"text"', b"null", b"17"):
            reply = await raw_call(stack, service, verb, data)
            assert reply["ok"] is False and reply["error"]["code"] == "bad_request", (service, verb, data, reply)
        reply = await raw_call(stack, service, verb, dumps(MISTYPED))
        assert reply["ok"] is False and reply["error"]["code"] == "validation_error", (service, verb, reply)
        reply = await raw_call(stack, service, verb, b"")  # empty: {} (valid for list_runs and attention)
        assert reply["ok"] or reply["error"]["code"] == "validation_error", (service, verb, reply)


async def test_out_of_range_numbers_and_unstorable_text_are_refused_as_bad_input(stack):
    tenant = await stack.tenant()
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = (await stack.submit(tenant, template, 1))["id"]
    refused = {"bad_request", "validation_error"}
    cases = [
        ("coordinator", "retry_file", {"tenant_id": tenant, "run_id": run, "file_index": BIG}),
        ("coordinator", "skip_file", {"tenant_id": tenant, "run_id": run, "file_index": 2**31}),
        ("coordinator", "get_run", {"tenant_id": tenant, "run_id": run, "file_offset": BIG}),
        ("coordinator", "get_run", {"tenant_id": tenant, "run_id": "r\x00n"}),
        ("coordinator", "list_runs", {"tenant_id": tenant, "cursor": "yesterday|abc"}),
        ("coordinator", "restore", {"tenant_id": tenant, "run_id": run, "checkpoint_step": HUGE}),
        ("coordinator", "create_run", {"tenant_id": tenant, "template_id": template,
                                       "files": [{"name": "a.txt", "size": HUGE}]}),
        ("billing", "reserve", {"tenant_id": tenant, "amount": 2**63, "idempotency_key": "k1"}),
        ("billing", "refund", {"tenant_id": tenant, "idempotency_key": "k2", "of_key": "k1", "amount": HUGE}),
        ("billing", "open_account", {"tenant_id": f"ten-{uuid.uuid4().hex[:8]}", "monthly_allowance": 2**63}),
        ("billing", "ledger", {"tenant_id": tenant, "cursor": "99999999999999999999999"}),
        ("billing", "ledger", {"tenant_id": tenant, "cursor": "²"}),  # isdigit() says yes, int() says no
        ("billing", "balance", {"tenant_id": "ten\x00ant"}),
        ("notifier", "list", {"tenant_id": "ten\x00ant"}),
        ("notifier", "mark_read", {"tenant_id": tenant, "id": "n\x00"}),
    ]
    for service, verb, payload in cases:
        reply = await raw_call(stack, service, verb, dumps(payload))
        assert reply["ok"] is False and reply["error"]["code"] in refused, (service, verb, payload, reply)
    # A value no schema bounds, refused by the database (bigint out of range): bad input, not "internal".
    rich = await stack.tenant(monthly=0, purchased=2**63 - 1)
    reply = await raw_call(stack, "billing", "grant", dumps({"tenant_id": rich, "purchased": 1}))
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert (await stack.call("billing", "balance", tenant_id=rich))["purchased"]["remaining"] == 2**63 - 1
    # Nothing was charged or changed by any of them.
    assert (await stack.run(tenant, run))["status"] == "RUNNING"
    assert [r["id"] for r in (await stack.call("coordinator", "list_runs", tenant_id=tenant))["items"]] == [run]
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 999
    await stack.assert_books_balance(tenant)


async def test_an_unknown_verb_is_told_so_not_that_the_service_is_down(stack):
    for service in ("coordinator", "billing", "notifier"):
        exc = await expect_error("unknown_verb", stack.call(service, "explode", tenant_id="t"))
        assert "explode" in exc.message
    with pytest.raises(ServiceError) as down:
        await stack.call("nobody", "get_run")
    assert down.value.code == "service_unavailable"


async def job_in_stream(stack: Stack, tenant: str, timeout: float = 10):
    """The tenant's latest job message, once the outbox relay has published it."""
    from nats.js.errors import NotFoundError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await stack.js.get_last_msg(stack.names.jobs_stream, stack.names.job(tenant))
        except NotFoundError:
            assert time.monotonic() < deadline, "the run's job was never published"
            await asyncio.sleep(0.02)


async def test_garbage_max_deliveries_advisories_are_ignored(stack):
    tenant = await stack.tenant()
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = (await stack.submit(tenant, template, 1))["id"]
    for data in (b"", b"not json", b"[]", b"null", dumps({"stream_seq": "first"}), dumps({"stream_seq": HUGE}),
                 dumps({"stream_seq": 10**6, "deliveries": 20})):  # no such message
        await stack.nc.publish(stack.names.max_deliveries_advisory, data)
    # Well-formed but untrue: the subject is open to any client, and a live job was failed
    # and deleted on such a word.
    await streams.ensure_consumer(stack.js, stack.names.jobs_stream, stack.names.executor_consumer, stack.names.jobs_all,
                              ack_wait_s=30, max_deliver=20)  # as an executor would
    seq = (await job_in_stream(stack, tenant)).seq
    advisory = {"stream": stack.names.jobs_stream, "consumer": stack.names.executor_consumer, "stream_seq": seq}
    for lie in ({**advisory, "deliveries": 1}, {**advisory, "consumer": "other", "deliveries": 20},
                {**advisory, "stream": "OTHER", "deliveries": 20}):
        await stack.nc.publish(stack.names.max_deliveries_advisory, dumps(lie))
    # Advisories are handled one after another: the true one comes last, and finds the job
    # still there only if every lie before it was ignored.
    await stack.nc.publish(stack.names.max_deliveries_advisory, dumps({**advisory, "deliveries": 20}))
    await stack.nc.flush()
    done = await stack.wait_run(tenant, run, timeout=10)
    assert (done["counts"]["failed"], done["files"][0]["attempts"]) == (1, 20)
    assert done["files"][0]["last_error"]["class"] == "PoisonJob"


async def test_a_request_without_a_reply_subject_is_ignored_and_the_service_keeps_answering(stack):
    tenant = await stack.tenant()
    for data in (b"not json", dumps({"tenant_id": tenant})):
        await stack.nc.publish(stack.names.service("billing", "balance"), data)
        await stack.nc.publish(stack.names.service("coordinator", "get_run"), data)
    await stack.nc.flush()
    assert (await stack.call("billing", "balance", tenant_id=tenant))["monthly"]["remaining"] == 1000
    await expect_error("not_found", stack.call("coordinator", "get_run", tenant_id=tenant, run_id="nope"))


# ---- (a) the jobs the executor pulls ----------------------------------------------------------

def job(run: str, tenant: str, template: str, index: int, **kw) -> dict:
    body = {"v": 1, "job_id": job_id_for(run, index, 0) + ":hand", "run_id": run, "tenant_id": tenant,
            "template_id": template, "mode": "per_file", "round": 0, "file_index": index, "start_step": 0,
            "files": [{"index": index, "name": f"f{index}.txt"}], "steps": [{"name": "a", "handler": "noop"}],
            "idempotency_key": "k"}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not ...}


async def test_unreadable_jobs_are_terminated_and_error_the_file_they_name(stack, executor):
    tenant, stranger = await stack.tenant(), await stack.tenant()
    # Slow real jobs: the hand-made ones below are read (and their files decided) first.
    template = await stack.template(tenant, [{"name": "slow", "handler": "flaky", "params": {"sleep_ms": 1500}}])
    run = (await stack.submit(tenant, template, 8, run_id=run_id()))["id"]
    before = await stack.js.consumer_info(stack.names.jobs_stream, stack.names.executor_consumer)
    subject = stack.names.job(tenant)
    unreadable = {
        1: job(run, tenant, template, 1, steps=...),  # a required field missing
        2: job(run, tenant, template, 2, mode="sideways"),  # an unknown kind of job
        3: job(run, tenant, template, 3, files=[]),  # a per-file job without its file
        4: job(run, tenant, template, 4, steps=[]),  # nothing to run
        5: job(run, tenant, template, 5, files=[{"index": 5, "name": "f5.txt", "start_step": -1}]),
        6: job(run, tenant, template, 6, retry={"auto_retries": 999}),
        7: job(run, tenant, template, 7, v=99),  # a schema version this release does not know
    }
    garbage = [b"", b"not json", b"[]", b'"job"', b"null", dumps({"job_id": 5}),
               dumps(job("no-such-run", tenant, template, 0, steps=...)),
               dumps(job(run, tenant, template, HUGE, steps=...)),
               dumps(job(run, tenant, template, 0, round=HUGE)),
               dumps(job(run, tenant, template, 99)),  # readable and runs, but the run has no file 99
               # Readable, but it claims another tenant's run: whatever it reports is not applied.
               dumps(job(run, stranger, template, 0, steps=[{"name": "x", "handler": "no-such-handler"}]))]
    await asyncio.gather(*(publish_raw(stack, subject, dumps(body)) for body in unreadable.values()),
                         *(publish_raw(stack, subject, data) for data in garbage))

    done = await stack.wait_run(tenant, run, timeout=15)
    assert done["status"] == "COMPLETED_WITH_ERRORS"
    assert (done["counts"]["succeeded"], done["counts"]["errored"]) == (1, 7)
    files = {f["index"]: f for f in done["files"]}
    assert files[0]["status"] == "SUCCEEDED"
    for index in unreadable:
        assert files[index]["status"] == "ERROR", files[index]
        error = files[index]["last_error"]
        assert error["class"] == "InvalidJob" and error["transient"] is False and error["message"], error
    assert "steps" in files[1]["last_error"]["message"] and "mode" in files[2]["last_error"]["message"]
    assert "files" in files[3]["last_error"]["message"]
    assert "v: Input should be 1" in files[7]["last_error"]["message"]
    info = await drained(stack, stack.names.jobs_stream, stack.names.executor_consumer)
    assert info.num_redelivered == before.num_redelivered
    # The executor still runs jobs.
    again = (await stack.submit(tenant, await stack.template(tenant, [{"name": "a", "handler": "noop"}]), 2))["id"]
    assert (await stack.wait_run(tenant, again, timeout=10))["status"] == "COMPLETED"


async def test_a_job_on_another_tenants_subject_is_refused_and_runs_nowhere(stack, executor):
    """A job of tenant A's run published on tenant B's subject ran, and counted on A's run."""
    from structlog.testing import capture_logs

    tenant, other = await stack.tenant(), await stack.tenant()
    template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
    run = (await stack.submit(tenant, template, 1, run_id=run_id()))["id"]
    await stack.wait_run(tenant, run, timeout=15)  # its own job ran
    forged = job(run, tenant, template, 0, job_id=job_id_for(run, 0, 0), files=..., file={"index": 0, "name": "f0.txt"})
    before = await stack.js.consumer_info(stack.names.jobs_stream, stack.names.executor_consumer)
    with capture_logs() as logs:
        await publish_raw(stack, stack.names.job(other), dumps(forged))
        info = await drained(stack, stack.names.jobs_stream, stack.names.executor_consumer)
    assert [entry["subject"] for entry in logs if entry["event"] == "job.wrong_subject"] == [stack.names.job(other)]
    assert info.delivered.stream_seq > before.delivered.stream_seq and info.num_redelivered == before.num_redelivered
    assert (await stack.run(tenant, run))["files"][0]["attempts"] == 1
