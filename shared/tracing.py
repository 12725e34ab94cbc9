"""W3C trace context (``traceparent``) on redrive's messages, so that one run's logs and
traces join up across services (messaging.md).

A run is one trace. Its trace id is the one of the request that created it when that
request carried a ``traceparent`` (the caller's trace goes on through the run), otherwise
the run id itself (32 hex digits, as W3C asks): then a log line's ``run_id`` is its trace
id too. Every job, file event and run event of the run carries it, each message with a
span id of its own; request/reply calls carry the caller's. We do not record spans (no
tracing SDK is bundled): a collector that reads NATS headers, and the ``trace_id`` bound
into every log line of a request or a job, are what join up.

The trace of what a task is doing lives in a context variable: a request's or a job's
task binds it (:func:`bound`), and what it sends takes it from there (:func:`outgoing`).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import re
from collections.abc import Iterator
from contextvars import ContextVar


HEADER = "traceparent"

# version - trace id - parent (span) id - flags; version ff is invalid, and a future
# version may append fields after the flags (W3C trace context, 3.2.2 and 4.3).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16

current: ContextVar[str | None] = ContextVar("redrive_trace_id", default=None)


def trace_id_of(value: str | None) -> str | None:
    """The trace id of a ``traceparent`` value, or None for anything W3C calls invalid
    (such a header is ignored, not refused: tracing must never fail a request)."""
    if not value or len(value) > 512:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id


def traceparent(trace_id: str) -> str:
    """A ``traceparent`` for one message of the trace: a span id of its own, sampled."""
    return f"00-{trace_id}-{random.getrandbits(64) | 1:016x}-01"


def new_trace_id() -> str:
    return f"{random.getrandbits(128) | 1:032x}"


def run_trace_id(run_id: str, stamped: str | None = None) -> str:
    """The trace of a run: the one stamped on it at creation, else its id when that is a
    valid trace id (ours are), else a hash of it."""
    if stamped:
        return stamped
    if _TRACE_ID.match(run_id) and run_id != _ZERO_TRACE:
        return run_id
    return hashlib.sha256(run_id.encode()).hexdigest()[:32]


@contextlib.contextmanager
def bound(trace_id: str | None) -> Iterator[None]:
    """Within the block, this task works for ``trace_id``: log lines carry it, and what it
    sends (:func:`outgoing`) continues it. Undone on exit (aiohttp serves a keep-alive
    connection's requests in one task)."""
    token = current.set(trace_id)
    try:
        yield
    finally:
        current.reset(token)


def bind(trace_id: str | None) -> None:
    """:func:`bound` for a task that ends with the work (a job's task): nothing to undo.
    Only a context variable is set (once per job, on the hot path): log lines read it
    when they are written (:func:`add_trace_id`)."""
    current.set(trace_id)


def add_trace_id(logger, method: str, event_dict: dict) -> dict:
    """structlog processor: the line's ``trace_id``, from the task it is logged in."""
    trace_id = current.get()
    if trace_id is not None:
        event_dict.setdefault("trace_id", trace_id)
    return event_dict


def outgoing() -> dict[str, str]:
    """Headers that continue this task's trace (none when it has none)."""
    trace_id = current.get()
    return {HEADER: traceparent(trace_id)} if trace_id else {}
