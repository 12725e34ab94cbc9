"""What the gateway accepts before it forwards anything (no servers needed)."""

import hashlib

import pytest

from shared.messages import ServiceError
from services.gateway.idempotency import check_key, request_hash
from services.gateway.routes import grant_key_for, run_id_for
from services.gateway.schemas import (
    NotificationsQuery, RunBody, RunsQuery, SettingsBody, WebhookBody, path_params, validate,
)


def test_a_valid_run_body_gets_its_defaults():
    assert validate(RunBody, {"template_id": "t", "files": [{"name": "a"}]}, "body") == {
        "template_id": "t", "files": [{"name": "a"}], "max_retry_count": 3, "mode": "per_file"}


@pytest.mark.parametrize("count", [0, 11, "many"])
def test_max_retry_count_outside_1_to_10_names_the_field(count):
    with pytest.raises(ServiceError) as caught:
        validate(RunBody, {"template_id": "t", "files": [{"name": "a"}], "max_retry_count": count}, "body")
    assert caught.value.code == "validation_error" and "max_retry_count" in caught.value.details["fields"]


def test_unknown_body_fields_are_refused():
    with pytest.raises(ServiceError) as caught:
        validate(RunBody, {"template_id": "t", "files": [{"name": "a"}], "priority": 9}, "body")
    assert "priority" in caught.value.details["fields"]


def test_a_webhook_url_scheme_is_case_insensitive_and_only_http_or_https():
    secret = "s" * 16
    assert validate(WebhookBody, {"url": "HTTPS://hooks.example.com/x", "secret": secret}, "body")["url"]
    for url in ("ftp://hooks.example.com/x", "hooks.example.com", "javascript:alert(1)"):
        with pytest.raises(ServiceError) as caught:
            validate(WebhookBody, {"url": url, "secret": secret}, "body")
        assert set(caught.value.details["fields"]) == {"url"}


def test_settings_need_backoff_max_at_least_base():
    with pytest.raises(ServiceError) as caught:
        validate(SettingsBody, {"backoff_base_ms": 1000, "backoff_max_ms": 999}, "body")
    assert set(caught.value.details["fields"]) == {"backoff_max_ms"}


def test_query_strings_are_converted_and_unknown_parameters_ignored():
    assert validate(RunsQuery, {"status": "failed", "needs_attention": "true", "limit": "20", "_": "1"}, "q") == {
        "status": "FAILED", "needs_attention": True, "limit": 20}
    assert validate(NotificationsQuery, {"unread": "1"}, "q") == {"unread_only": True}
    with pytest.raises(ServiceError):
        validate(RunsQuery, {"status": "sleeping"}, "q")


def test_a_file_index_must_be_a_non_negative_integer():
    assert path_params({"run_id": "r", "file_index": "3"}) == {"run_id": "r", "file_index": 3}
    for bad in ("-1", "x", "²", "1" * 12):
        with pytest.raises(ServiceError):
            path_params({"file_index": bad})


def test_the_request_hash_ignores_key_order_and_spacing_but_not_values():
    a = request_hash("POST", "/p", {"a": 1, "b": [1, 2]})
    assert a == request_hash("post", "/p", {"b": [1, 2], "a": 1})
    assert a != request_hash("POST", "/p", {"a": 2, "b": [1, 2]})
    assert a != request_hash("POST", "/q", {"a": 1, "b": [1, 2]})
    assert request_hash("POST", "/p", None) != request_hash("POST", "/p", {})


def test_idempotency_keys_are_bounded_and_run_ids_derive_from_tenant_key_and_nonce():
    assert check_key(" k ") == "k"
    for bad in ("", "x" * 256, "a\nb"):
        with pytest.raises(ServiceError):
            check_key(bad)
    rid = run_id_for("t1", "k", "n1")
    assert len(rid) == 32 and rid == run_id_for("t1", "k", "n1") != run_id_for("t2", "k", "n1")
    assert rid != run_id_for("t1", "k", "n2")  # the same key in another window: another run
    # A record from before nonces keeps naming its run by tenant and key alone.
    assert run_id_for("t1", "k", None) == hashlib.sha256(b"t1:k").hexdigest()[:32] != rid
    assert grant_key_for("g", None) == "grant:g" and grant_key_for("g", "n1") == "grant:g:n1"
