"""Hand-built hot-path messages still match their schemas."""

from shared.errors import TransientError, classify
from shared.messages import FileEvent, FileSpec, Job, StepSpec
from services.executor.job_runner import file_event_body
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
