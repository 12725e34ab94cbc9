"""Lean JetStream publishing and pulling for the hot paths (one of each per file).

nats-py's ``publish_async`` and ``PullSubscription.fetch`` do the job, but pay per message
for things a busy service feels: a ``secrets.token_hex`` (a getrandom syscall) and a
dataclass ``PubAck`` per publish; a ``wait_for`` (a new task) per fetched message. These
two classes speak the same JetStream protocol with one subscription each, set up once:

- :class:`AckedPublisher` publishes with a reply inbox ``<inbox>.<n>`` and resolves a
  future when the stream's PubAck (or error) comes back.
- :class:`Puller` sends pull requests (``$JS.API.CONSUMER.MSG.NEXT``) whose messages land
  on a callback subscription; ``fetch`` returns what arrived, without a task per message.

Both survive reconnects: nats-py re-subscribes, and a request lost with the old connection
just runs into its timeout. bench/limits.py measures the hand-written hops with these same
primitives, so the ratio it prints is not flattered by them.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import MaxPayloadError
from nats.js.errors import APIError, NoStreamResponseError

_STATUS = "Status"
_NO_RESPONDERS = "503"
# Pull statuses that end a request: no messages (no_wait) and request timeout (expires).
_REQUEST_DONE = ("404", "408")
_HEARTBEAT = "100"


class PublishError(Exception):
    """JetStream refused or could not store a message (no stream, stream error)."""


class AckedPublisher:
    """Publish to JetStream and get a future per message that resolves on its PubAck.

    A PubAck that never comes (the server went away mid-flight) fails its future with
    ``TimeoutError`` after ``ack_timeout_s``: one sweep a second checks, rather than a
    timer per message.
    """

    def __init__(self, nc: NatsClient, ack_timeout_s: float = 10.0) -> None:
        self._nc = nc
        self._ack_timeout_s = ack_timeout_s
        self._prefix = ""
        self._next = itertools.count()
        self._pending: dict[str, tuple[asyncio.Future, float]] = {}
        self._started: asyncio.Future | None = None
        self._sweeper: asyncio.Task | None = None

    async def _start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep(), name="pubacks-sweep")

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None) -> asyncio.Future:
        """Send the message; the returned future holds the stream sequence or an error.

        A message the server would refuse for its size (headers and body together, while
        nats-py checks only the body) raises ``MaxPayloadError`` here: sent, it would make
        the server close the connection, and nats-py would not reconnect."""
        size = len(data) + (sum(len(k) + len(v) + 4 for k, v in headers.items()) + 12 if headers else 0)
        if size > self._nc.max_payload:
            raise MaxPayloadError(f"a message of {size} bytes with its headers is over the server's max payload "
                                  f"({self._nc.max_payload})")
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        if not self._started.done():
            await self._started
        token = str(next(self._next))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[token] = (future, loop.time() + self._ack_timeout_s)
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return future

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._nc.is_closed:
            await asyncio.sleep(1.0)
            now = loop.time()
            expired = [token for token, (_, deadline) in self._pending.items() if deadline < now]
            for token in expired:
                future, _ = self._pending.pop(token)
                if not future.done():
                    future.set_exception(TimeoutError(f"no PubAck within {self._ack_timeout_s:g}s"))

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix):], None)
        if entry is None or entry[0].done():
            return
        future = entry[0]
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            future.set_exception(NoStreamResponseError())
            return
        try:
            reply = orjson.loads(msg.data)
            error = reply.get("error")
        except (orjson.JSONDecodeError, AttributeError) as exc:
            future.set_exception(PublishError(f"unreadable PubAck: {exc}"))
            return
        if error:
            # The stream refused it (too large a header, storage full…). Every path resolves
            # the future: it left the pending list above, so the sweep would never time it out.
            future.set_exception(_refusal(error))
        else:
            future.set_result(reply.get("seq"))


def _refusal(error: object) -> Exception:
    """nats-py's APIError for a JetStream error reply (its ``from_error`` raises it rather
    than returning it), or a PublishError for a reply shaped unlike the API's."""
    try:
        APIError.from_error(error)  # type: ignore[arg-type]
    except APIError as exc:
        return exc
    except Exception:
        pass
    return PublishError(f"JetStream refused the message: {str(error)[:300]}")


# How long past its expiry a request counts as open when its end status has not come: the
# status follows the request's last message on the connection, and a loop busy elsewhere (a
# synchronous step, a collection) reads both late. Only a status lost for good waits it out.
_END_STATUS_GRACE_S = 5.0


class PullError(Exception):
    """The server refused a pull request (consumer deleted, too many waiting requests…)."""


class Puller:
    """Fetch batches from a durable pull consumer (explicit ack: callers ack each message).

    ``fetch(n)`` first asks for what is there now (``no_wait``) and returns it; if nothing
    is, it waits for the first message of a lingering request, then returns what has
    arrived by then. Messages a lingering request delivers after that are kept for the
    next fetch (they are ours: the server counted them as delivered).

    One request is open at a time: while a lingering request may still deliver, the next
    fetch waits for what it brings instead of asking again. Two open requests could bring
    twice what the caller has room for (the executor sizes each fetch by its free slots),
    and the surplus would wait here unstarted, its ack wait running, until the server gave
    it to another executor while this one still held it: a step run twice.
    """

    def __init__(self, nc: NatsClient, stream: str, consumer: str) -> None:
        self._nc = nc
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = ""
        self._next = itertools.count()
        self._ready: deque[Msg] = deque()
        self._arrived = asyncio.Event()
        self._ended: str | None = None  # token of the request whose end status came in
        self._waiting_for = ""
        self._refused: str | None = None
        self._sub = None
        # The open request (see the class docstring): what it may still deliver, on which
        # connection (nats-py's reconnect count: a request dies with its connection), and a
        # last resort should its end status never come.
        self._owed = 0
        self._owed_on = 0
        self._owed_until = 0.0
        self._sub_on = 0  # the connection (reconnect count) the inbox was subscribed on

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub_on = self._nc.stats["reconnects"]
        self._sub = await self._nc.subscribe(self._inbox + ".*", cb=self._on_msg)

    async def _resubscribe(self) -> None:
        """A fresh inbox for a new connection. A request sent on the old one may still be
        open at the server (only the TCP connection dropped), and nats-py subscribes its
        inbox again: it would go on delivering beside the next request. Without interest in
        its reply subject, the server drops it instead."""
        await self.stop()
        await self._nc.flush()  # the server has dropped our interest before the next request
        await self.start()

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None

    async def fetch(self, batch: int, timeout: float = 1.0, *, wait: bool = True) -> list[Msg]:
        """Up to ``batch`` messages; an empty list when none came within ``timeout``
        (at once with ``wait=False``: only what the consumer has now)."""
        if self._sub is None:
            await self.start()
        elif self._nc.stats["reconnects"] != self._sub_on and self._nc.is_connected:
            await self._resubscribe()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if wait else 0.0)
        if not self._ready and self._still_owed():
            await self._await_owed(deadline)
        if not self._ready and not self._still_owed():
            if not self._nc.is_connected:
                # Sent now, a request would wait in nats-py's buffer and reach the server on
                # reconnect with every other one sent meanwhile, all of them open at once.
                await asyncio.sleep(max(0.0, min(deadline - loop.time(), 0.25)))
            else:
                await self._request(batch, no_wait=True, timeout=timeout)
                left = deadline - loop.time()
                if not self._ready and left > 0.01 and self._nc.is_connected:
                    await self._request(batch, no_wait=False, timeout=left)
        out = []
        while self._ready and len(out) < batch:
            out.append(self._ready.popleft())
        return out

    def _still_owed(self) -> bool:
        """Whether the open request may still deliver: until its end status comes, or all it
        asked for has come (in order, on the one connection: a loop busy elsewhere reads them
        late, but reads them before the end status)."""
        return (self._owed > 0 and self._nc.stats["reconnects"] == self._owed_on
                and asyncio.get_running_loop().time() < self._owed_until)

    async def _await_owed(self, deadline: float) -> None:
        """Wait for the open request's next message, its end, or ``deadline``."""
        loop = asyncio.get_running_loop()
        while not self._ready and self._still_owed() and not self._refused:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                async with asyncio.timeout(min(remaining, 0.25)):  # 0.25: a reconnect ends it too
                    await self._arrived.wait()
            except TimeoutError:
                pass
        if self._refused:
            raise PullError(self._refused)

    async def _request(self, batch: int, *, no_wait: bool, timeout: float) -> None:
        token = str(next(self._next))
        self._waiting_for, self._ended, self._refused = token, None, None
        expires = max(timeout - 0.05, 0.01)
        body = {"batch": batch, "no_wait": True} if no_wait else {"batch": batch, "expires": int(expires * 1e9)}
        self._arrived.clear()
        loop = asyncio.get_running_loop()
        self._owed, self._owed_on = batch, self._nc.stats["reconnects"]
        self._owed_until = loop.time() + (timeout if no_wait else expires) + _END_STATUS_GRACE_S
        await self._nc.publish(self._api, orjson.dumps(body), reply=f"{self._inbox}.{token}")
        deadline = loop.time() + timeout
        # no_wait: wait for the whole answer (n messages or its end status); lingering:
        # for the first message or the end status.
        while True:
            if self._refused:
                raise PullError(self._refused)
            if self._ended == token or len(self._ready) >= batch or (not no_wait and self._ready):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
        if not no_wait and self._ready:
            await asyncio.sleep(0)  # let the rest of what is already in the socket land

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        status = headers.get(_STATUS) if headers and not msg.data else None
        if status is None:
            self._ready.append(msg)
            self._owed -= 1
        elif status == _HEARTBEAT:
            return
        elif status in _REQUEST_DONE:
            if msg.subject.rpartition(".")[2] == self._waiting_for:
                self._ended, self._owed = self._waiting_for, 0
        else:  # 409 and friends: the consumer is gone, or we asked for too much
            if msg.subject.rpartition(".")[2] == self._waiting_for:
                self._refused, self._owed = f"{status} {headers.get('Description', '')}".strip(), 0
        self._arrived.set()
