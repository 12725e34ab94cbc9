"""Failure, stated once: what is transient (retry it) and what is permanent (never retry).

Every layer raises or maps to one of the two roots below; the executor's ack middleware
turns them into nak-with-delay or term, the coordinator into FAILED or ERROR. Anything
that is neither is classified by :func:`classify` and the decision is written there.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass


class RedriveError(Exception):
    """A redrive error."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class TransientError(RedriveError):
    """A temporary failure; the same work may succeed if tried again later."""

    def __init__(self, message: str | None = None, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentError(RedriveError):
    """A failure that will not go away by trying again (bad input, unknown handler)."""


class InvalidOutput(PermanentError):
    """A step returned output that cannot be carried on: not JSON, or too big for a message."""


class StepTimeout(TransientError):
    """The step ran past its timeout and was cancelled."""


class DependencyUnavailable(TransientError):
    """A dependency's circuit breaker is open; the job was deferred, not attempted."""


# An error's message travels in file events, rows, notifications and webhooks: a handler
# quoting a whole response (or a 1 MB URL) in its exception must not make them huge.
MAX_MESSAGE_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Classified:
    transient: bool
    error_class: str
    message: str
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if len(self.message) > MAX_MESSAGE_CHARS:
            object.__setattr__(self, "message", self.message[:MAX_MESSAGE_CHARS - 1] + "…")
        if len(self.error_class) > 200:
            object.__setattr__(self, "error_class", self.error_class[:200])

    def as_dict(self) -> dict:
        return {"class": self.error_class, "message": self.message, "transient": self.transient}


# PostgreSQL SQLSTATE classes that mean "try again": connection exceptions, insufficient
# resources, operator intervention (e.g. admin shutdown), plus serialization failure and
# deadlock. Everything else from the database is a bug or bad data: permanent.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57")
_TRANSIENT_SQLSTATES = {"40001", "40P01"}

# HTTP statuses that mean "try again": request timeout, too many requests, server errors.
_TRANSIENT_HTTP = {408, 429}


def is_transient_http_status(status: int) -> bool:
    return status in _TRANSIENT_HTTP or 500 <= status <= 599


def is_transient_sqlstate(sqlstate: str | None) -> bool:
    if not sqlstate:
        return False
    return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)


def _sqlstate_of(exc: BaseException) -> str | None:
    # asyncpg errors carry .sqlstate; SQLAlchemy wraps them in .orig (DBAPIError).
    for candidate in (exc, getattr(exc, "orig", None), getattr(getattr(exc, "orig", None), "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


def classify(exc: BaseException) -> Classified:
    """Decide whether ``exc`` is worth retrying.

    Decision for the unknown: an exception we do not recognise is **permanent**. A handler
    that wants retries raises :class:`TransientError` (or lets a timeout or connection error
    escape); retrying arbitrary bugs would only burn the user's retry budget and credits.
    """
    name = type(exc).__name__
    if isinstance(exc, TransientError):
        return Classified(True, name, exc.message or name, exc.retry_after_s)
    if isinstance(exc, PermanentError):
        return Classified(False, name, exc.message or name)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Classified(True, name, str(exc) or "timed out")
    if isinstance(exc, (ConnectionError, socket.gaierror)):
        return Classified(True, name, str(exc) or "connection error")
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status <= 599:
        transient = is_transient_http_status(status)
        return Classified(transient, name, f"HTTP {status}: {exc}")
    sqlstate = _sqlstate_of(exc)
    if sqlstate is not None:
        return Classified(is_transient_sqlstate(sqlstate), name, f"SQLSTATE {sqlstate}: {exc}")
    try:  # aiohttp's connection-level errors are OSErrors underneath, but not all.
        import aiohttp

        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return Classified(True, name, str(exc) or name)
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        pass
    if isinstance(exc, OSError):
        return Classified(True, name, str(exc) or name)
    return Classified(False, name, str(exc) or name)


def refuses_its_data(exc: BaseException) -> bool:
    """True when the database refused a value of the message or request itself: SQLSTATE
    class 22 (data exception: a NUL byte in text, a number out of range, a malformed
    date…), or asyncpg refusing to encode an argument (its client-side ``DataError``, a
    ValueError under SQLAlchemy's wrapper). Sending it again changes nothing, so consumers
    terminate such a message at once and request handlers answer ``bad_request``."""
    sqlstate = _sqlstate_of(exc)
    if sqlstate is not None:
        return sqlstate.startswith("22")
    orig = getattr(exc, "orig", None)
    return any(isinstance(c, ValueError) for c in (orig, getattr(orig, "__cause__", None)))
