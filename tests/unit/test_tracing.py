"""W3C traceparent parsing and building (shared/tracing.py)."""

import pytest

from shared import tracing

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value", [
    None, "", "garbage", VALID.upper(),  # upper-case hex is invalid
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    VALID + "-extra",  # version 00 has nothing after the flags
    VALID + "x" * 600,
])
def test_invalid_traceparents_are_ignored(value):
    assert tracing.trace_id_of(value) is None


def test_a_valid_traceparent_gives_its_trace_and_a_later_version_may_add_fields():
    assert tracing.trace_id_of(VALID) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.trace_id_of(" " + VALID + " ") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.trace_id_of("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes") is not None


def test_each_message_of_a_trace_gets_a_valid_parent_of_its_own():
    trace_id = tracing.new_trace_id()
    headers = [tracing.traceparent(trace_id) for _ in range(50)]
    assert all(tracing.trace_id_of(h) == trace_id for h in headers)
    assert len({h.split("-")[2] for h in headers}) == 50


def test_a_runs_trace_is_the_stamped_one_else_its_id_else_a_hash_of_it():
    run_id = "d34b6a9be4614073b63ff89cb2dad03c"
    assert tracing.run_trace_id(run_id, "4bf92f3577b34da6a3ce929d0e0e4736") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.run_trace_id(run_id) == run_id
    odd = tracing.run_trace_id("run-with-another-shape")
    assert len(odd) == 32 and tracing.trace_id_of(tracing.traceparent(odd)) == odd


def test_bound_puts_the_trace_in_logs_and_outgoing_headers_and_undoes_it():
    trace_id = tracing.new_trace_id()
    with tracing.bound(trace_id):
        assert tracing.trace_id_of(tracing.outgoing()[tracing.HEADER]) == trace_id
        assert tracing.add_trace_id(None, "info", {"event": "x"}) == {"event": "x", "trace_id": trace_id}
    assert tracing.outgoing() == {} and tracing.add_trace_id(None, "info", {"event": "x"}) == {"event": "x"}

