"""Whether the server answers a round trip (and this connection still reads): /readyz's
NATS check, and the live-event subscription's proof that its SUB reached the server."""

from __future__ import annotations

import nats
from nats.aio.client import Client as NatsClient


class RoundTrip:
    """Whether the server answers a round trip within a timeout (and this connection still
    reads): a request to an inbox of this connection's own, which it answers itself. Only
    ``_INBOX.>`` (which every request's reply needs anyway) is used; another subscriber
    there gets a copy and changes nothing.

    Not ``nc.flush(timeout)``: when it times out (a hung server), nats-py cancels the PING's
    future but leaves it queued, and the PONG that comes later raises InvalidStateError in
    its read loop, which ends: the connection then looks connected and reads nothing (no
    replies, no events) until its ping check gives up on it minutes later. A request's
    future leaves nats-py's map when it times out; a late reply finds nothing."""

    def __init__(self, nc: NatsClient | None) -> None:
        self._nc = nc
        self._subject = ""

    async def answers(self, timeout: float) -> bool:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            if not self._subject:
                subject = nc.new_inbox()
                await nc.subscribe(subject, cb=self._echo)
                self._subject = subject
            await nc.request(self._subject, b"", timeout=timeout)
        except nats.errors.NoRespondersError:
            return True  # the server answered (our subscription is not there yet: a reconnect)
        except Exception:  # timed out, or the connection went meanwhile
            return False
        return True

    @staticmethod
    async def _echo(msg) -> None:
        if msg.reply:
            await msg.respond(b"")
