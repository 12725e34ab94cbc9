"""Structured logs (structlog): key=value for people, JSON lines with REDRIVE_LOG_JSON=1."""

from __future__ import annotations

import logging
import sys

import structlog

from shared import tracing
from shared.settings import Settings


def configure_logging(settings: Settings, service: str) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
    logging.getLogger("aiohttp.server").addFilter(_one_line_for_malformed_requests)


def _one_line_for_malformed_requests(record: logging.LogRecord) -> bool:
    """aiohttp logs every request its HTTP parser refuses (an oversized header, a bad
    Content-Length, a method that is no method…) with a full traceback at ERROR: anyone
    who can reach the port could fill the log with them. They are the client's mistake, a
    warning line each; real errors keep their traceback."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg = f"{record.getMessage()}: {type(exc).__name__}: {' '.join(str(exc).split())}"
        record.args = None
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True
