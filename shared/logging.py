"""Structured logs (structlog): key=value for people, JSON lines with REDRIVE_LOG_JSON=1."""

from __future__ import annotations

import logging
import re
import sys

import structlog

from shared import tracing
from shared.settings import Settings


class _Stderr:
    """stderr for the logs, that drops them once nobody reads it any more. Under `redrive up`
    it is a pipe to the supervisor (redrive/service_log.py); a supervisor killed -9 leaves
    its services a pipe with no reader, and a BrokenPipeError from a log line would end a
    service's graceful shutdown (finish in-flight jobs, drain) half way."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._broken = False

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
                self._broken = True
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._broken = True


def configure_logging(settings: Settings, service: str) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    stderr = _Stderr(sys.stderr)
    logging.basicConfig(stream=stderr, level=level, format="%(message)s")
    renderer = structlog.processors.JSONRenderer() if settings.log_json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            tracing.add_trace_id,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.getLogger("aiohttp.server").addFilter(_one_line_for_malformed_requests)


# What aiohttp's parser errors quote of the request: b'…', '…' or "…" (cut short or not).
_QUOTED = re.compile(r"""b?'(?:[^'\\]|\\.)*'?|b?"(?:[^"\\]|\\.)*"?""")


def _one_line_for_malformed_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs every request its HTTP parser refuses (an oversized header, a bad
    Content-Length, a method that is no method…) with a full traceback at ERROR: anyone
    who can reach the port could fill the log with them. They are the client's mistake, a
    warning line each; real errors keep their traceback. What aiohttp quotes of the request
    is left out: the start of an oversized header line is someone's Authorization or Cookie."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        said = _QUOTED.sub("<…>", " ".join(str(exc).split()))
        record.msg = f"{record.getMessage()}: {type(exc).__name__}: {said}"
        record.args = None
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True
