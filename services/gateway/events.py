"""Live events for browsers (SSE): one NATS subscription per process, fanned out to the
connected clients of each tenant through bounded queues. A slow client loses events
rather than slowing everyone (it can re-read state from the API)."""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web
from nats.aio.client import Client as NatsClient

from shared.subjects import Names

KEEPALIVE_S = 15.0


class EventHub:
    def __init__(self, nc: NatsClient, names: Names) -> None:
        self._nc = nc
        self._names = names
        self._clients: dict[asyncio.Queue, str] = {}
        self._sub = None
        self._subscribing = asyncio.Lock()

    async def start(self) -> None:
        pass  # subscribed only while someone listens: idle gateways cost the bus nothing

    async def _listen(self) -> None:
        async with self._subscribing:
            if self._sub is None:
                self._sub = await self._nc.subscribe(self._names.events_all, cb=self._on_event)

    async def _maybe_stop_listening(self) -> None:
        async with self._subscribing:
            if not self._clients and self._sub is not None:
                sub, self._sub = self._sub, None
                await sub.unsubscribe()

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()
        for queue in list(self._clients):
            queue.put_nowait(None)

    async def _on_event(self, msg) -> None:
        if not self._clients:
            return
        try:
            tenant = orjson.loads(msg.data).get("tenant_id")
        except ValueError:
            return
        kind = msg.subject[len(self._names.prefix) + len(".events."):]
        frame = f"event: {kind}\ndata: {msg.data.decode()}\n\n".encode()
        for queue, client_tenant in self._clients.items():
            if tenant is None or tenant == client_tenant:
                if queue.qsize() < 1000:
                    queue.put_nowait(frame)

    async def stream(self, request: web.Request, tenant_id: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue = asyncio.Queue()
        self._clients[queue] = tenant_id
        await self._listen()
        try:
            await response.write(b": connected\n\n")
            while True:
                try:
                    frame = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    frame = b": keepalive\n\n"
                if frame is None:
                    break
                await response.write(frame)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.pop(queue, None)
            await self._maybe_stop_listening()
        return response
