"""Every number a setting takes is finite and bounded: a value that would crash a timer or
fail every PostgreSQL make_interval later is refused at start, naming the variable. And
what bad input reaches billing or `redrive tenant create` is refused as such, never a crash."""

from __future__ import annotations

import asyncio
import types

import orjson
import pytest
from pydantic import ValidationError

from redrive.bootstrap_admin import create_tenant
from services.billing import handlers
from services.billing.bootstrap import VERBS
from services.billing.schemas import OpenAccount
from shared.rpc import MicroService
from shared.settings import Settings
from shared.subjects import Names
from tests.unit.test_cli_bad_input import cli, one_line_error  # noqa: F401  (cli: a fixture)

_NUMBERS = {name for name, f in Settings.model_fields.items() if f.annotation in (int, float)}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A clean environment: no REDRIVE_* setting but the data dir."""
    import os

    for name in list(os.environ):
        if name.startswith("REDRIVE_") or name in ("NATS_URL", "DATABASE_URL"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("REDRIVE_DATA_DIR", str(tmp_path))

    def settings(**variables: str) -> Settings:
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return settings


BAD = [
    ("REDRIVE_EXECUTOR_ACK_WAIT_S", "inf"), ("REDRIVE_EXECUTOR_ACK_WAIT_S", "1e300"),
    ("REDRIVE_EXECUTOR_ACK_WAIT_S", "1e-9"), ("REDRIVE_EXECUTOR_ACK_WAIT_S", "nan"),
    ("REDRIVE_EXECUTOR_ACK_WAIT_S", "43201"),
    ("REDRIVE_RECOVERY_LEASE_S", "1e308"), ("REDRIVE_RECOVERY_LEASE_S", "0"), ("REDRIVE_RECOVERY_LEASE_S", "604801"),
    ("REDRIVE_CREDIT_INTENT_TIMEOUT_S", "1e308"), ("REDRIVE_CREDIT_INTENT_TIMEOUT_S", "-inf"),
    ("REDRIVE_CREDIT_INTENT_TIMEOUT_S", "1e-9"),
    ("REDRIVE_WEBHOOK_TIMEOUT_S", "inf"), ("REDRIVE_WEBHOOK_TIMEOUT_S", "301"), ("REDRIVE_WEBHOOK_TIMEOUT_S", "1e-9"),
    ("REDRIVE_RECOVERY_INTERVAL_S", "inf"), ("REDRIVE_RECOVERY_INTERVAL_S", "604801"), ("REDRIVE_RECOVERY_INTERVAL_S", "1e-9"),
    ("REDRIVE_REQUEST_TIMEOUT_S", "inf"), ("REDRIVE_REQUEST_TIMEOUT_S", "601"), ("REDRIVE_REQUEST_TIMEOUT_S", "1e-9"),
    ("REDRIVE_NOTIFICATION_RETENTION_DAYS", "inf"), ("REDRIVE_NOTIFICATION_RETENTION_DAYS", "1e-9"),
    ("REDRIVE_WEBHOOK_DELIVERY_RETENTION_DAYS", "nan"), ("REDRIVE_WEBHOOK_DELIVERY_RETENTION_DAYS", "36501"),
    ("REDRIVE_DUPLICATE_WINDOW_S", "86401"), ("REDRIVE_DUPLICATE_WINDOW_S", "599"),
    ("REDRIVE_EXECUTOR_CONCURRENCY", "10001"), ("REDRIVE_EXECUTOR_FETCH_BATCH", "10001"),
    ("REDRIVE_EXECUTOR_MAX_DELIVER", "10001"), ("REDRIVE_RESULTS_FETCH_BATCH", "10001"),
    ("REDRIVE_OUTBOX_BATCH", "100001"), ("REDRIVE_MAX_FILES_PER_RUN", "1000001"),
    ("REDRIVE_RECOVERY_MAX_FAILURES", "10001"), ("REDRIVE_WEBHOOK_MAX_ATTEMPTS", "1001"),
    ("REDRIVE_RESULTS_GATHER_MS", "1001"), ("REDRIVE_STREAM_REPLICAS", "6"), ("REDRIVE_PORT", "65536"),
    ("REDRIVE_OUTBOX_BATCH", "1e400"), ("REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S", "30,inf"),
    ("REDRIVE_LOG_LEVEL", "LOUD"), ("REDRIVE_LOG_LEVEL", ""), ("REDRIVE_LOG_LEVEL", "10"),
]


@pytest.mark.parametrize("variable, value", BAD)
def test_a_bad_value_is_refused_naming_its_variable(env, variable, value):
    with pytest.raises(ValidationError) as refused:
        env(**{variable: value})
    assert [str(e["loc"][0]).upper() for e in refused.value.errors()] == [variable.removeprefix("REDRIVE_")]


@pytest.mark.parametrize("variable, value", [b for b in BAD if b[0] in (
    "REDRIVE_EXECUTOR_ACK_WAIT_S", "REDRIVE_RECOVERY_LEASE_S", "REDRIVE_CREDIT_INTENT_TIMEOUT_S",
    "REDRIVE_WEBHOOK_TIMEOUT_S", "REDRIVE_RECOVERY_INTERVAL_S", "REDRIVE_LOG_LEVEL")])
def test_the_cli_and_services_stop_at_start_with_one_line_naming_the_variable(cli, variable, value):  # noqa: F811
    for args in (["credits"], ["service", "executor"], ["service", "coordinator"], ["service", "notifier"]):
        one_line_error(cli(*args, env={variable: value}, code=2), "invalid configuration:", f"{variable}={value!r}:")


def test_the_defaults_are_accepted(env):
    settings = env()
    for name in _NUMBERS | {"log_level"}:
        assert getattr(settings, name) == Settings.model_fields[name].default, name


@pytest.mark.parametrize("variables", [
    # generous production values, at the top of each range
    {"REDRIVE_EXECUTOR_ACK_WAIT_S": "43200", "REDRIVE_EXECUTOR_REDELIVERY_BACKOFF_S": "43200,86400"},
    {"REDRIVE_RECOVERY_LEASE_S": "604800", "REDRIVE_RECOVERY_INTERVAL_S": "604800",
     "REDRIVE_CREDIT_INTENT_TIMEOUT_S": "604800"},
    {"REDRIVE_WEBHOOK_TIMEOUT_S": "300", "REDRIVE_REQUEST_TIMEOUT_S": "600", "REDRIVE_DUPLICATE_WINDOW_S": "86400"},
    {"REDRIVE_EXECUTOR_CONCURRENCY": "10000", "REDRIVE_EXECUTOR_FETCH_BATCH": "10000", "REDRIVE_EXECUTOR_MAX_DELIVER": "10000",
     "REDRIVE_RESULTS_FETCH_BATCH": "10000", "REDRIVE_OUTBOX_BATCH": "100000", "REDRIVE_MAX_FILES_PER_RUN": "1000000",
     "REDRIVE_RECOVERY_MAX_FAILURES": "10000", "REDRIVE_WEBHOOK_MAX_ATTEMPTS": "1000"},
    {"REDRIVE_NOTIFICATION_RETENTION_DAYS": "36500", "REDRIVE_WEBHOOK_DELIVERY_RETENTION_DAYS": "0.01"},
    # the short values tests and chaos runs use, at the bottom
    {"REDRIVE_EXECUTOR_ACK_WAIT_S": "0.5", "REDRIVE_RECOVERY_INTERVAL_S": "0.1", "REDRIVE_RECOVERY_LEASE_S": "0.5",
     "REDRIVE_CREDIT_INTENT_TIMEOUT_S": "0.5", "REDRIVE_WEBHOOK_TIMEOUT_S": "0.5", "REDRIVE_REQUEST_TIMEOUT_S": "0.5"},
])
def test_generous_values_are_accepted(env, variables):
    settings = env(**variables)
    for variable, value in variables.items():
        field = variable.removeprefix("REDRIVE_").lower()
        expected = [float(v) for v in value.split(",")] if field.endswith("backoff_s") else float(value)
        assert getattr(settings, field) == expected


@pytest.mark.parametrize("value, level", [("debug", "DEBUG"), ("Warning", "WARNING"), ("ERROR", "ERROR"),
                                          ("critical", "CRITICAL"), (" info ", "INFO")])
def test_log_levels_by_name_in_any_case(env, value, level):
    assert env(REDRIVE_LOG_LEVEL=value).log_level == level


# Billing: a tenant id is at most 64 characters, as the coordinator's.

@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_billing_command_refuses_a_tenant_id_over_64_characters(verb):
    model = VERBS[verb][0]
    with pytest.raises(ValidationError) as refused:
        model.model_validate({"tenant_id": "t" * 65})
    assert "tenant_id" in [e["loc"][0] for e in refused.value.errors() if e["type"] == "string_too_long"]
    assert OpenAccount(tenant_id="t" * 64).tenant_id == "t" * 64


async def test_open_account_with_a_200_kb_tenant_id_answers_validation_error():
    answered: list[bytes] = []
    request = types.SimpleNamespace(data=orjson.dumps({"tenant_id": "t" * 200_000}), headers={})

    async def respond(body: bytes) -> None:
        answered.append(body)

    request.respond = respond
    model, handler = VERBS["open_account"]

    async def verb(payload: dict):  # as the billing service binds it; never reaches the database
        return await handler(None, model.model_validate(payload))

    micro = MicroService(types.SimpleNamespace(max_payload=1 << 20), Names("t"), "billing", {}, "")
    await micro._answer("open_account", verb, request)
    error = orjson.loads(answered[0])["error"]
    assert error["code"] == "validation_error" and "tenant_id" in error["details"]["fields"]


# Tenant names: at most 200 characters, no control characters.

@pytest.mark.parametrize("name, said", [
    ("n" * 201, "at most 200"), ("n" * 100_000, "at most 200"), ("a\nb", "control characters (U+000A"),
    ("a\x1b[31mb", "control characters (U+001B"), ("a\x00b", "control characters (U+0000"),
    ("a\u2028b", "control characters (U+2028"), ("  ", "must not be empty"),
], ids=["201-chars", "100000-chars", "newline", "escape", "nul", "line-separator", "blank"])
def test_tenant_create_refuses_a_bad_name(cli, name, said):  # noqa: F811
    text = one_line_error(cli("tenant", "create", name, code=2), said)
    assert name.strip() == "" or name[:50] not in text  # the name itself is not echoed back


@pytest.mark.parametrize("name", ["n" * 200, "Acme GmbH & Co. KG", "Café – Zürich 株式会社"], ids=["200-chars", "ascii", "unicode"])
def test_tenant_create_accepts_a_long_or_unicode_name(cli, name):  # noqa: F811
    # past the name check, on to the next one: no database named
    one_line_error(cli("tenant", "create", name, code=1), "DATABASE_URL is not set")


def test_create_tenant_checks_the_name_before_touching_the_database(env):
    settings = env()  # no DATABASE_URL: any database use would fail otherwise
    with pytest.raises(ValueError, match="at most 200"):
        asyncio.run(create_tenant(settings, "n" * 201))
