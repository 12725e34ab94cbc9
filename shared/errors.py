"""Failure, stated once: what is transient (retry it) and what is permanent (never retry).

Every layer raises or maps to one of the two roots below; the executor's ack middleware
turns them into nak-with-delay or term, the coordinator into FAILED or ERROR. Anything
that is neither is classified by :func:`classify` and the decision is written there.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from shared.backoff import parse_retry_after


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

# HTTP statuses that mean "try again": request timeout, too early (RFC 8470: the server
# asks for the same request again later), too many requests, server errors. Any other 4xx
# says the request itself is wrong (credentials, permission, not found, validation), and
# sending it again changes nothing. 409 stays permanent on purpose: most APIs answer it for
# "already exists" or a stale version, and the SDKs that do retry it (openai, anthropic)
# have already done so before their error reaches a handler.
_TRANSIENT_HTTP = {408, 425, 429}


def is_transient_http_status(status: int) -> bool:
    return status in _TRANSIENT_HTTP or 500 <= status <= 599


def is_transient_sqlstate(sqlstate: str | None) -> bool:
    if not sqlstate:
        return False
    return sqlstate in _TRANSIENT_SQLSTATES or sqlstate.startswith(_TRANSIENT_SQLSTATE_PREFIXES)


def sqlstate_of(exc: BaseException) -> str | None:
    # asyncpg errors carry .sqlstate; SQLAlchemy wraps them in .orig (DBAPIError).
    for candidate in (exc, getattr(exc, "orig", None), getattr(getattr(exc, "orig", None), "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if code:
            return str(code)
    return None


# Errors of HTTP clients that carry no status yet mean "no answer came": a timeout, a
# refused or dropped connection. Recognised by (top-level package, class name) anywhere in
# the exception's MRO, so that none of these libraries is imported (or a dependency) here.
# The package is compared, not the whole module, because httpx, openai and anthropic
# rewrite ``__module__`` of what they export to the package ("httpx._exceptions.ReadTimeout"
# is "httpx.ReadTimeout" at runtime). Subclasses count: httpx's ReadTimeout is a
# TimeoutException, the SDKs' APITimeoutError an APIConnectionError.
_TRANSIENT_CLIENT_ERRORS = frozenset({
    # httpx: every timeout, a connection refused or cut (NetworkError), a server that hung
    # up mid-answer, an unreachable proxy. Its other TransportErrors (UnsupportedProtocol,
    # LocalProtocolError) are our own request's fault and stay permanent.
    ("httpx", "TimeoutException"), ("httpx", "NetworkError"), ("httpx", "RemoteProtocolError"),
    ("httpx", "ProxyError"),
    # requests (ConnectTimeout, ReadTimeout, SSLError, ProxyError are subclasses); a body cut
    # short; RetryError: urllib3 ran out of retries on a status of the session's
    # status_forcelist, which callers fill with 429 and 5xx.
    ("requests", "ConnectionError"), ("requests", "Timeout"), ("requests", "ChunkedEncodingError"),
    ("requests", "RetryError"),
    # aiohttp: its connection errors are not all OSErrors (ServerDisconnectedError is not).
    ("aiohttp", "ClientConnectionError"), ("aiohttp", "ClientPayloadError"),
    # The openai and anthropic SDKs; their status errors carry .status_code, decided by it.
    ("openai", "APIConnectionError"), ("anthropic", "APIConnectionError"),
})

# requests' errors are OSErrors (RequestException subclasses IOError), which the builtin
# rule would retry; a malformed URL, too many redirects or a body that is not JSON is no
# outage. Those of its errors not recognised above are permanent.
_PERMANENT_CLIENT_ERROR_ROOTS = frozenset({("requests", "RequestException")})


def _attr(obj: object, name: str) -> object:
    try:
        return getattr(obj, name, None)
    except Exception:  # a property that raises (httpx's .request before it is set) tells nothing
        return None


def _http_status_of(exc: BaseException) -> int | None:
    # aiohttp's ClientResponseError has .status, the SDKs' errors .status_code, httpx's
    # HTTPStatusError and requests' HTTPError only the .response they were raised for.
    response = _attr(exc, "response")
    for holder, name in ((exc, "status"), (exc, "status_code"), (response, "status_code"), (response, "status")):
        value = _attr(holder, name)
        # bool is an int; anything outside 100-599 is some other library's "status".
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return int(value)
    return None


def _retry_after_of(exc: BaseException) -> float | None:
    # Read as the executor's own HTTP handlers read it (shared/backoff.parse_retry_after).
    headers = _attr(_attr(exc, "response"), "headers") or _attr(exc, "headers")
    try:
        value = headers.get("Retry-After") or headers.get("retry-after")  # type: ignore[union-attr]
    except Exception:  # no headers, or headers of a shape we do not know
        return None
    return parse_retry_after(value) if isinstance(value, str) else None


def _client_error_verdict(exc: BaseException) -> bool | None:
    # True: transient, False: permanent, None: not a client error we know.
    names = {((k.__module__ or "").partition(".")[0], k.__qualname__) for k in type(exc).__mro__}
    if names & _TRANSIENT_CLIENT_ERRORS:
        return True
    if names & _PERMANENT_CLIENT_ERROR_ROOTS:
        return False
    return None


def classify(exc: BaseException) -> Classified:
    """Decide whether ``exc`` is worth retrying.

    In order: our own two roots; an HTTP status the error carries (408, 425, 429 and 5xx
    transient, with a numeric ``Retry-After``; any other 4xx permanent); builtin timeouts
    and connection errors, then those of httpx, requests, aiohttp and the openai/anthropic
    SDKs (transient; requests' other errors permanent); SQLSTATE; other OSErrors (transient).

    Decision for the unknown: an exception we do not recognise is **permanent**. A handler
    that wants retries raises :class:`TransientError` (or lets a timeout or connection error
    escape); retrying arbitrary bugs would only burn the user's retry budget and credits.
    """
    name = type(exc).__name__
    if isinstance(exc, TransientError):
        return Classified(True, name, exc.message or name, exc.retry_after_s)
    if isinstance(exc, PermanentError):
        return Classified(False, name, exc.message or name)
    # A status the dependency answered decides before the error's class: requests' HTTPError
    # is an OSError whatever the status, and an SDK's RateLimitError is no builtin at all.
    status = _http_status_of(exc)
    if status is not None and 400 <= status <= 599:
        if is_transient_http_status(status):
            return Classified(True, name, f"HTTP {status}: {exc}", _retry_after_of(exc))
        return Classified(False, name, f"HTTP {status}: {exc}")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return Classified(True, name, str(exc) or "timed out")
    if isinstance(exc, (ConnectionError, socket.gaierror)):
        return Classified(True, name, str(exc) or "connection error")
    # Before the OSError rule below, which would retry every error of requests.
    verdict = _client_error_verdict(exc)
    if verdict is not None:
        return Classified(verdict, name, str(exc) or name)
    sqlstate = sqlstate_of(exc)
    if sqlstate is not None:
        transient = is_transient_sqlstate(sqlstate) or prepared_before_a_migration(exc)
        return Classified(transient, name, f"SQLSTATE {sqlstate}: {exc}")
    if isinstance(exc, OSError):
        return Classified(True, name, str(exc) or name)
    return Classified(False, name, str(exc) or name)


def prepared_before_a_migration(exc: BaseException) -> bool:
    """A statement asyncpg prepared before a migration changed its table ("cached plan must
    not change result type", met by a ``SELECT *`` in a transaction while `redrive migrate`
    adds a column under running services): the driver has dropped its cached statements,
    and the same request again works."""
    orig = getattr(exc, "orig", None)
    return any(type(c).__name__ == "InvalidCachedStatementError" for c in (exc, orig, getattr(orig, "__cause__", None)))


def refuses_its_data(exc: BaseException) -> bool:
    """True when the database refused a value of the message or request itself: SQLSTATE
    class 22 (data exception: a NUL byte in text, a number out of range, a malformed
    date…), or asyncpg refusing to encode an argument (its client-side ``DataError``, a
    ValueError under SQLAlchemy's wrapper). Sending it again changes nothing, so consumers
    terminate such a message at once and request handlers answer ``bad_request``."""
    sqlstate = sqlstate_of(exc)
    if sqlstate is not None:
        return sqlstate.startswith("22")
    orig = getattr(exc, "orig", None)
    return any(isinstance(c, ValueError) for c in (orig, getattr(orig, "__cause__", None)))
