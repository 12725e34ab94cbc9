"""Request/reply between services: NATS micro services (discoverable with `nats micro ls`).

A service registers plain ``async def verb(payload: dict) -> data`` functions; this module
turns them into micro endpoints on ``<prefix>.svc.<service>.<verb>``, runs each request in
its own task (a slow request must not queue the others behind it), and maps
:class:`ServiceError` to the ``{"ok": false, "error": …}`` envelope. A body that is not a
JSON object, or holds a NUL character (no field can store one), is ``bad_request`` before
any verb runs; a value the database refuses (out of range, malformed) is ``bad_request``
too. Anything else is logged with its stack and answered as ``internal`` without the stack.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import nats
import orjson
import structlog
from nats.aio.client import Client as NatsClient
from nats.micro import ServiceConfig
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service
from pydantic import ValidationError

from shared import tracing
from shared.db import is_transient_db_error
from shared.errors import classify, refuses_its_data
from shared.messages import ServiceError, error_reply, ok_reply
from shared.requests import field_errors
from shared.subjects import Names

log = structlog.get_logger(__name__)

Verb = Callable[[dict[str, Any]], Awaitable[Any]]

VERSION = "0.1.0"
# The ``v`` of every request body (messaging.md).
REQUEST_VERSION = 1


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def validation_error(exc: ValidationError) -> ServiceError:
    return ServiceError("validation_error", "the request is not valid", {"fields": field_errors(exc)})


class MicroService:
    def __init__(self, nc: NatsClient, names: Names, service: str, verbs: Mapping[str, Verb], description: str) -> None:
        self._nc = nc
        self._names = names
        self._service_name = service
        self._verbs = dict(verbs)
        self._description = description
        self._service: Service | None = None
        self._inflight: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._service = Service(
            self._nc,
            ServiceConfig(
                name=f"{self._names.prefix}-{self._service_name}",
                version=VERSION,
                description=self._description,
                queue_group=f"{self._names.prefix}-{self._service_name}",
            ),
        )
        for verb, fn in self._verbs.items():
            await self._service.add_endpoint(
                EndpointConfig(name=verb, subject=self._names.service(self._service_name, verb), handler=self._spawn(verb, fn))
            )
        # Discovery last (add_service would start it first): a caller that meets no responder
        # asks discovery whether the service lacks the verb (RpcClient._lacks_verb), and one
        # answered while a restarted service was still adding its endpoints was told that it
        # had no such verb ("unknown_verb") instead of "not running".
        await self._service.start()

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=10)

    def _spawn(self, verb: str, fn: Verb) -> Callable[[Request], Awaitable[None]]:
        async def handler(request: Request) -> None:
            task = asyncio.create_task(self._answer(verb, fn, request))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

        return handler

    async def _answer(self, verb: str, fn: Verb, request: Request) -> None:
        # Its own task (see _spawn): the caller's trace is bound for this request alone.
        tracing.bind(tracing.trace_id_of(request.headers.get(tracing.HEADER)) if request.headers else None)
        deadline = _deadline_of(request)
        if deadline is not None and time.time() > deadline:
            # The caller gave up and answered its client "unavailable": a request that NATS
            # held through an outage and delivered now must not run (it would charge, create
            # or grant what the client was told had failed, and a retry would do it twice).
            log.warning("rpc.expired", service=self._service_name, verb=verb)
            return
        _caller_deadline.set(deadline)
        try:
            payload = orjson.loads(request.data) if request.data else {}
            if not isinstance(payload, dict):
                raise ServiceError("bad_request", "the request body must be a JSON object")
            # Every body carries its schema version (messaging.md); a caller from before it was
            # sent speaks the first.
            version = payload.pop("v", REQUEST_VERSION)
            if version != REQUEST_VERSION:
                raise ServiceError("bad_request", f"request version {str(version)[:20]} is not supported "
                                                  f"(this service speaks {REQUEST_VERSION})")
            # JSON can carry NUL only escaped: look closer only then (PostgreSQL stores none).
            if b"\\u0000" in request.data and _has_nul(payload):
                raise ServiceError("bad_request", "the request holds a NUL character, which no field accepts")
            body = ok_reply(await fn(payload))
        except ServiceError as exc:
            body = error_reply(exc)
        except ValidationError as exc:
            body = error_reply(validation_error(exc))
        except orjson.JSONDecodeError:
            body = error_reply(ServiceError("bad_request", "the request body is not JSON"))
        except Exception as exc:
            if refuses_its_data(exc):  # the request's own value: the caller's to fix, not ours
                log.warning("rpc.value_refused", service=self._service_name, verb=verb, error=repr(exc)[:300])
                body = error_reply(ServiceError("bad_request", "a value of the request is out of range or malformed"))
            elif is_transient_db_error(exc) or (classified := classify(exc)).transient:
                # A pooled connection that PostgreSQL's restart closed is unavailable, as
                # PostgreSQL down is (a 503 to retry), not a bug of ours (a 500).
                classified = classify(exc)
                # One line, no stack: during an outage every request lands here.
                log.warning("rpc.dependency_unavailable", service=self._service_name, verb=verb, error=repr(exc)[:300])
                body = error_reply(ServiceError("dependency_unavailable", "a dependency is unavailable; try again",
                                                {"cause": classified.error_class}))
            else:
                log.exception("rpc.failed", service=self._service_name, verb=verb, error=repr(exc))
                body = error_reply(ServiceError("internal", f"{self._service_name} could not complete {verb}"))
        if len(body) > self._nc.max_payload:
            log.error("rpc.reply_too_large", service=self._service_name, verb=verb, size=len(body))
            body = error_reply(ServiceError("response_too_large", f"the answer to {verb} is larger than the bus allows"))
        await self._respond(request, verb, body)

    async def _respond(self, request: Request, verb: str, body: bytes) -> None:
        try:
            await request.respond(body)
        except Exception as exc:  # the caller went away or NATS dropped: nothing to answer
            log.warning("rpc.respond_failed", verb=verb, error=repr(exc))


class RpcClient:
    """Calls another service's verbs; raises :class:`ServiceError` for refusals and
    ``service_unavailable`` when nobody answers in time."""

    def __init__(self, nc: NatsClient, names: Names, timeout: float = 15.0) -> None:
        self._nc = nc
        self._names = names
        self._timeout = timeout

    @property
    def max_payload(self) -> int:
        """The largest request the bus carries (the server's max payload)."""
        return self._nc.max_payload

    async def call(self, service: str, verb: str, payload: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        subject = self._names.service(service, verb)
        payload = payload or {}
        data = orjson.dumps({"v": REQUEST_VERSION, **payload}, default=_default)
        if not self._nc.is_connected:
            # nats-py would hold the request until it reconnects and send it then, after we
            # told our caller it failed: refuse at once instead.
            raise ServiceError("service_unavailable", "the message bus is unavailable", {"service": service})
        timeout = timeout or self._timeout
        headers = {**tracing.outgoing(), DEADLINE_HEADER: f"{time.time() + timeout:.3f}", **_about(payload)}
        try:
            msg = await self._nc.request(subject, data, timeout=timeout, headers=headers)
        except nats.errors.NoRespondersError:
            # Nobody listens on the verb's subject: either the service is down (or still
            # subscribing again after a reconnect), or it is up and has no such verb. Its micro
            # discovery subjects tell which.
            if await self._lacks_verb(service, subject):
                raise ServiceError("unknown_verb", f"the {service} service has no verb {verb!r}",
                                   {"service": service, "verb": verb})
            raise ServiceError("service_unavailable", f"the {service} service is not running", {"service": service})
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            raise ServiceError("service_unavailable", f"the {service} service did not answer in time",
                               {"service": service, "outcome": "unknown"})
        except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, nats.errors.StaleConnectionError):
            raise ServiceError("service_unavailable", "the message bus is unavailable", {"service": service})
        if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
            raise ServiceError("internal", msg.headers.get("Nats-Service-Error", "service error"))
        try:
            reply = orjson.loads(msg.data)
            ok = reply.get("ok")
        except (orjson.JSONDecodeError, AttributeError):  # something else answers on the subject
            raise ServiceError("internal", f"the {service} service sent an unreadable reply to {verb}")
        if ok:
            return reply.get("data")
        err = reply.get("error") or {}
        raise ServiceError(err.get("code", "internal"), err.get("message", "error"), err.get("details") or {})

    async def _lacks_verb(self, service: str, subject: str) -> bool:
        """True only when the service answers and lists its endpoints without ``subject``."""
        try:
            info = await self._nc.request(f"$SRV.INFO.{self._names.prefix}-{service}", b"",
                                          timeout=min(1.0, self._timeout))
            endpoints = orjson.loads(info.data).get("endpoints") or []
        except Exception:  # no responders, timeout, connection trouble, garbled: not (visibly) running
            return False
        return all(e.get("subject") != subject for e in endpoints if isinstance(e, dict))


# When the caller stops waiting (unix seconds): a request still undelivered by then is dropped.
DEADLINE_HEADER = "Redrive-Deadline"


# The deadline of the request this task answers (each request runs in its own task).
_caller_deadline: ContextVar[float | None] = ContextVar("caller_deadline", default=None)
# Time for a commit and the answer's way back.
COMMIT_MARGIN_S = 1.0


def _deadline_of(request: Request) -> float | None:
    raw = request.headers.get(DEADLINE_HEADER) if request.headers else None
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None  # not ours to judge: answer it


def caller_time_left() -> float | None:
    """Seconds until the caller of the request being answered stops waiting (None: it
    did not say)."""
    deadline = _caller_deadline.get()
    return None if deadline is None else deadline - time.time()


def ensure_caller_waits(margin_s: float = COMMIT_MARGIN_S) -> None:
    """Refuse (``service_unavailable``) to go on when the caller of the request being
    answered stops waiting within ``margin_s``. Called just before a commit that creates
    or charges: slowed down (billing or the database slow to answer), such a request would
    commit after the gateway told its client 503, and the client's retry would create and
    charge a second time. Raised inside the transaction, it rolls it back (and the charge
    is compensated), so the 503 tells the truth."""
    deadline = _caller_deadline.get()
    if deadline is not None and time.time() + margin_s > deadline:
        raise ServiceError("service_unavailable", "the request took too long; nothing was done, send it again")


def _about(payload: dict[str, Any]) -> dict[str, str]:
    """The Redrive-Tenant and Redrive-Run headers of a request about a tenant or a run
    (messaging.md), so that tooling sees whose it is without reading the body."""
    headers = {}
    for header, field in (("Redrive-Tenant", "tenant_id"), ("Redrive-Run", "run_id")):
        value = payload.get(field)
        if isinstance(value, str) and value.isascii() and value.isprintable() and 0 < len(value) <= 200:
            headers[header] = value
    return headers


def _default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(type(value).__name__)
