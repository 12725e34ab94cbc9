"""A Puller asks nothing of a connection that is down: nats-py would keep the request in
its buffer and send it on reconnect with every other one asked meanwhile, all open at once,
each to be filled up to the caller's free slots."""

from __future__ import annotations

import asyncio

from shared.jetstream import Puller


class _Down:
    is_connected = False
    stats = {"reconnects": 0}

    def __init__(self) -> None:
        self.published: list[str] = []

    def new_inbox(self) -> str:
        return "_INBOX.x"

    async def subscribe(self, subject, cb):
        return self

    async def unsubscribe(self) -> None:
        pass

    async def publish(self, subject, payload=b"", reply="", headers=None) -> None:
        self.published.append(subject)


async def test_no_pull_request_is_sent_while_the_connection_is_down():
    nc = _Down()
    puller = Puller(nc, "JOBS", "executor")
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(3):
        assert await puller.fetch(10, timeout=0.1) == []
    assert nc.published == [] and loop.time() - started < 1.0
    nc.is_connected = True
    assert await puller.fetch(10, timeout=0.05) == []  # asked now: no answer in this test
    assert nc.published and all(s == "$JS.API.CONSUMER.MSG.NEXT.JOBS.executor" for s in nc.published)


async def test_a_request_sent_before_a_reconnect_is_not_waited_for():
    nc = _Down()
    nc.is_connected = True
    puller = Puller(nc, "JOBS", "executor")
    await puller.fetch(10, timeout=0.05)  # a lingering request, unanswered: owed until its end
    assert puller._still_owed()
    nc.stats = {"reconnects": 1}  # it died with the old connection
    assert not puller._still_owed()
