"""The jobs stream's max age (REDRIVE_JOBS_MAX_AGE_S): below the run-stops bucket's TTL, so
no job outlives the stop that covers it (services/executor/run_stops.py), and longer than
any wait of a live job, which it would otherwise drop."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.coordinator.run_stops import TTL_S
from shared.settings import Settings


def _bound(name: str, key: str) -> float:
    [value] = [getattr(m, key) for m in Settings.model_fields[name].metadata if hasattr(m, key)]
    return value


def test_the_longest_max_age_allowed_is_below_the_run_stops_ttl():
    # shared/settings.py does not import services: this keeps the two in step.
    assert _bound("jobs_max_age_s", "le") < TTL_S
    assert Settings.model_fields["jobs_max_age_s"].default <= _bound("jobs_max_age_s", "le")


def test_the_default_is_accepted(tmp_path):
    settings = Settings(data_dir=tmp_path)
    assert settings.jobs_max_age_s == 7 * 24 * 3600 > settings.executor_ack_wait_s


def _refusal(tmp_path, **values) -> str:
    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path, **values)
    [error] = refused.value.errors()
    assert error["loc"] == ("jobs_max_age_s",)
    return error["msg"]


@pytest.mark.parametrize("max_age", [10, 30])
def test_a_max_age_not_longer_than_the_ack_wait_is_refused(tmp_path, max_age):
    message = _refusal(tmp_path, executor_ack_wait_s=30, jobs_max_age_s=max_age)
    assert "REDRIVE_JOBS_MAX_AGE_S" in message and "REDRIVE_EXECUTOR_ACK_WAIT_S (30 s)" in message


@pytest.mark.parametrize("max_age", [200, 300])
def test_a_max_age_not_longer_than_the_largest_backoff_is_refused(tmp_path, max_age):
    message = _refusal(tmp_path, executor_ack_wait_s=30, executor_redelivery_backoff_s=[30, 300, 60],
                       jobs_max_age_s=max_age)
    assert "REDRIVE_JOBS_MAX_AGE_S" in message and "REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S value (300 s)" in message


def test_a_max_age_longer_than_every_wait_is_accepted(tmp_path):
    settings = Settings(data_dir=tmp_path, executor_ack_wait_s=1, executor_redelivery_backoff_s=[1, 5],
                        jobs_max_age_s=5.5)
    assert settings.jobs_max_age_s == 5.5


def test_from_the_environment_the_refusal_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("REDRIVE_JOBS_MAX_AGE_S", "60")
    monkeypatch.setenv("REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S", "30,120")
    monkeypatch.setenv("REDRIVE_EXECUTOR_ACK_WAIT_S", "30")
    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path)
    assert [e["loc"] for e in refused.value.errors()] == [("jobs_max_age_s",)]
    assert "(120 s)" in refused.value.errors()[0]["msg"]
