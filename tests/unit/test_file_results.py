"""The rules of applying file events, on files in memory (file_results.fold); results.py
stores what fold works out, and tests/integration/test_results.py checks it end to end."""

from __future__ import annotations

import orjson

from services.coordinator.file_results import FileState, fold
from shared.messages import ErrorInfo, FileEvent, job_id_for

RUN = {"r": {"id": "r", "tenant_id": "t"}}


def pending(idx: int, cp: int | None = None) -> FileState:
    return FileState("r", idx, f"{idx}.txt", "PENDING", 0, 0, cp)


def event(kind: str, idx: int, step: int = 0, attempt: int = 1, **extra) -> FileEvent:
    return FileEvent(kind=kind, job_id=job_id_for("r", idx, 0), run_id="r", tenant_id="t", file_index=idx, round=0,
                     attempt=attempt, step=step, **extra)


def error(cls: str = "Boom", transient: bool = True) -> ErrorInfo:
    return ErrorInfo.model_validate({"class": cls, "transient": transient, "message": "x"})


def test_the_first_terminal_result_of_a_round_wins_and_counts_once():
    files = {("r", 0): pending(0)}
    folded = fold([event("failed", 0, error=error()), event("succeeded", 0, output={})], RUN, files)
    delta = folded.deltas["r"]
    assert files[("r", 0)].status == "FAILED" and (delta.done, delta.s, delta.f) == (1, 0, 1)


def test_a_checkpoint_never_moves_a_file_back():
    files = {("r", 0): pending(0, cp=2)}
    fold([event("checkpoint", 0, step=1, output={"a": 1})], RUN, files)
    assert files[("r", 0)].cp == 2 and files[("r", 0)].outs == {}


def test_only_a_success_or_checkpoint_advances_a_run_a_retry_does_not():
    files = {("r", 0): pending(0), ("r", 1): pending(1)}
    assert not fold([event("retrying", 0, error=error(), next_delay_ms=500)], RUN, files).deltas["r"].advanced
    assert fold([event("checkpoint", 1, output={})], RUN, files).deltas["r"].advanced


def test_a_deferral_whose_file_finished_in_the_same_batch_leaves_the_run_waiting_for_nothing():
    files = {("r", 0): pending(0), ("r", 1): pending(1)}
    deferred = event("deferred", 0, dependency="api", next_delay_ms=3000)
    assert fold([deferred, event("succeeded", 0, output={})], RUN, files).waiting == {}
    assert fold([event("deferred", 1, dependency="api", next_delay_ms=3000)], RUN, files).waiting == {"r": 3000}


def test_a_poison_jobs_failure_is_at_the_step_after_the_files_checkpoint():
    files = {("r", 0): pending(0, cp=1)}
    folded = fold([event("errored", 0, step=0, error=error("PoisonJob", transient=False))], RUN, files)
    assert files[("r", 0)].fs == 2 and orjson.loads(folded.log_entries[-1]["details"])["step"] == 2
