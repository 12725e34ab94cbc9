"""The settings that bound what a tenant or an anonymous caller can do to shared parts:
safe by default, each read from its REDRIVE_* variable, bad values refused at start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tests.unit.test_settings_bounds import env  # noqa: F401  (a fixture: settings from a clean environment)


def test_the_defaults_are_the_safe_ones(env):
    s = env()
    assert s.executor_allow_crash is False  # flaky's crash param refused
    assert (s.sse_max_per_key, s.sse_max_per_tenant) == (10, 100)
    assert s.metrics_token is None  # /metrics public, as the contract has it


def test_each_is_read_from_its_variable(env):
    token = "x" * 16
    s = env(REDRIVE_EXECUTOR_ALLOW_CRASH="true", REDRIVE_SSE_MAX_PER_KEY="3", REDRIVE_SSE_MAX_PER_TENANT="30",
            REDRIVE_METRICS_TOKEN=token)
    assert (s.executor_allow_crash, s.sse_max_per_key, s.sse_max_per_tenant, s.metrics_token) == (True, 3, 30, token)
    assert env(REDRIVE_METRICS_TOKEN="").metrics_token is None  # set but empty: as unset


@pytest.mark.parametrize("variable, value", [
    ("REDRIVE_SSE_MAX_PER_KEY", "0"), ("REDRIVE_SSE_MAX_PER_KEY", "10001"),
    ("REDRIVE_SSE_MAX_PER_TENANT", "0"), ("REDRIVE_SSE_MAX_PER_TENANT", "100001"),
    ("REDRIVE_METRICS_TOKEN", "short"), ("REDRIVE_METRICS_TOKEN", "has a space in it ok"),
    ("REDRIVE_METRICS_TOKEN", "é" * 20), ("REDRIVE_EXECUTOR_ALLOW_CRASH", "maybe"),
])
def test_a_bad_value_is_refused_naming_its_variable(env, variable, value):
    with pytest.raises(ValidationError) as refused:
        env(**{variable: value})
    assert [str(e["loc"][0]).upper() for e in refused.value.errors()] == [variable.removeprefix("REDRIVE_")]
