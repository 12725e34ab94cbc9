"""Hand-built hot-path messages still match their schemas."""

import orjson
import pytest
from pydantic import ValidationError

from shared.errors import TransientError, classify
from shared.messages import FileEvent, FileSpec, Job, StepSpec
from services.executor.file_events import file_event_body
from services.executor.outcome import Outcome


def _job(mode="per_file"):
    return Job(job_id="r1:file:3:r2" if mode == "per_file" else "r1:batch:r2", run_id="r1", tenant_id="t", template_id="x",
               mode=mode, round=2, file_index=3 if mode == "per_file" else None, files=[FileSpec(index=3, name="a")],
               steps=[StepSpec(name="s0", handler="noop"), StepSpec(name="s1", handler="noop")], idempotency_key="k")


def test_file_event_body_parses_as_a_file_event_with_the_contract_msg_id():
    outcome = Outcome("retry", 1, error=classify(TransientError("slow down")), delay_ms=250)
    msg_id, body = file_event_body(_job(), 3, outcome, 2, "retrying")
    event = FileEvent.model_validate_json(body)
    assert event.msg_id == msg_id == "r1:file:3:r2:retrying:1:2"
    assert (event.kind, event.round, event.step_name, event.next_delay_ms) == ("retrying", 2, "s1", 250)
    assert event.error.transient and event.error.message == "slow down"


def test_batch_event_ids_name_the_file():
    msg_id, body = file_event_body(_job("batch"), 3, Outcome("succeeded", 1, output={"ok": 1}), 1, "succeeded")
    event = FileEvent.model_validate_json(body)
    assert msg_id == event.msg_id == "r1:batch:r2:3:succeeded:1:1"
    assert event.output == {"ok": 1}


def test_job_rows_parse_as_jobs_that_resume_after_their_checkpoint():
    from services.coordinator.jobs import job_rows
    from shared.messages import RetryPolicy
    from shared.subjects import Names

    run = {"id": "r1", "tenant_id": "t", "template_id": "x", "mode": "per_file", "round": 1}
    template = {"steps": [{"name": "a", "handler": "noop"}, {"name": "b", "handler": "checksum", "optional": True}]}
    files = [{"idx": 0, "name": "a.pdf", "url": "http://x/a", "checkpoint_step": None},
             {"idx": 1, "name": "b.pdf", "checkpoint_step": 0, "checkpoint_output": {"k": 1}}]
    rows = job_rows(Names(), run, template, files, RetryPolicy(auto_retries=5), msg_suffix=":rec1")
    jobs = [Job.model_validate_json(r["payload"]) for r in rows]
    assert [j.job_id for j in jobs] == ["r1:file:0:r1", "r1:file:1:r1"]
    assert [r["msg_id"] for r in rows] == ["r1:file:0:r1:rec1", "r1:file:1:r1:rec1"]
    assert [j.start_step for j in jobs] == [0, 1] and jobs[1].file.previous_output == {"k": 1}
    assert jobs[0].retry.auto_retries == 5 and jobs[0].steps[1].optional
    # messaging.md's shape: a per_file job carries "file", a batch job "files".
    raw = orjson.loads(rows[0]["payload"])
    assert raw["file"]["index"] == raw["file_index"] == 0 and "files" not in raw
    assert {"v", "job_id", "run_id", "tenant_id", "template_id", "file_index", "round", "start_step", "file", "retry",
            "idempotency_key"} <= raw.keys() and raw["idempotency_key"] == raw["job_id"]
    batch = job_rows(Names(), {**run, "mode": "batch"}, template, files, RetryPolicy())
    assert len(batch) == 1 and len(Job.model_validate_json(batch[0]["payload"]).files) == 2


@pytest.mark.parametrize("shape, error", [
    ({"file": {"index": 3, "name": "a"}, "files": [{"index": 3, "name": "a"}]}, "never both"),
    ({}, "carries no file"),
    ({"files": [{"index": 3, "name": "a"}, {"index": 4, "name": "b"}]}, "exactly one file"),
    ({"file": {"index": 4, "name": "a"}}, "names file 3 but carries file 4"),
])
def test_a_per_file_job_carries_one_file_one_way(shape, error):
    base = orjson.loads(_job().to_bytes())
    base.pop("files", None)
    with pytest.raises(ValidationError, match=error):
        Job.model_validate({**base, **shape})


def test_a_per_file_job_in_the_earlier_shape_is_still_read():
    base = orjson.loads(_job().to_bytes())
    old = {**{k: v for k, v in base.items() if k != "file"}, "files": [{"index": 3, "name": "a"}]}
    assert Job.model_validate(old).every_file[0].index == 3


def test_progress_merge_never_goes_back():
    from services.executor.progress import Progress, _merge

    stored = Progress(failures=2, deferrals=1, step=1, output={"s": 1})
    stale = Progress(failures=1, deferrals=3, step=0, output={"s": 0})
    merged = _merge(stored, stale)
    assert (merged.failures, merged.deferrals, merged.step, merged.output) == (2, 3, 1, {"s": 1})
    assert _merge(stored, Progress(step=2, output={"s": 2})).output == {"s": 2}


def test_delivery_count_is_read_from_both_ack_subject_forms():
    from nats.aio.msg import Msg

    from services.executor.deliveries import deliveries

    v1 = "$JS.ACK.REDRIVE_JOBS.executor.3.120.118.1764400000000000000.7"
    v2 = "$JS.ACK.hub.ACCHASH.REDRIVE_JOBS.executor.4.120.118.1764400000000000000.7.tok"
    for reply, expected in ((v1, 3), (v2, 4), ("", 1), ("_INBOX.abc", 1)):
        msg = Msg(_client=None, subject="redrive.jobs.t", reply=reply, data=b"")
        assert deliveries(msg) == expected
        if reply.startswith("$JS"):
            assert msg.metadata.num_delivered == expected  # agrees with nats-py's own parser


def test_error_messages_are_cut_not_refused_wherever_they_come_from():
    """A 1 MB error (a handler quoting a whole response) travelled in events and rows and
    made a tenant's notification list too large to answer."""
    from shared.errors import MAX_MESSAGE_CHARS, classify
    from shared.messages import ErrorInfo
    from services.notifier.texts import MAX_TEXT_CHARS, file_failed_text

    classified = classify(RuntimeError("x" * 1_000_000))
    assert len(classified.message) == MAX_MESSAGE_CHARS and classified.message.endswith("…")
    forged = ErrorInfo.model_validate({"class": "C" * 10_000, "message": "m" * 1_000_000, "transient": False})
    assert (len(forged.error_class), len(forged.message)) == (200, MAX_MESSAGE_CHARS)
    event = FileEvent(kind="failed", job_id="r:file:0:r0", run_id="r", tenant_id="t", file_index=0, round=0, attempt=4,
                      step=0, step_name="s" * 100_000, error=forged)
    from services.coordinator.run_events import FILE_FAILED_MESSAGE_CHARS, file_failed_row
    from shared.messages import RunEvent
    from shared.subjects import Names

    row = file_failed_row(Names("t"), {"id": "r", "tenant_id": "t", "status": "RUNNING"}, event)
    notice = RunEvent.from_bytes(row["payload"])
    assert len(notice.message) == FILE_FAILED_MESSAGE_CHARS and len(file_failed_text(notice)) == MAX_TEXT_CHARS
