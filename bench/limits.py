"""The raw limit of redrive's two hops, done by hand on the same servers: (1) job: JetStream
publish, pull, ack; (2) result: publish, pull, ack, and a batched PostgreSQL update per
file. The best page of batching we can write, to compare the real system against."""

from __future__ import annotations

import time
import uuid

import asyncpg
import nats
from nats.js.api import RetentionPolicy, StreamConfig

from shared.settings import Settings


async def _hop(js, stream: str, subject: str, n: int, on_batch=None) -> None:
    await js.add_stream(StreamConfig(name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE))
    futures = [await js.publish_async(subject, b'{"job":"x"}', headers={"Nats-Msg-Id": f"{stream}-{i}"}) for i in range(n)]
    for f in futures:
        await f
    sub = await js.pull_subscribe(subject, durable=f"{stream}-c", stream=stream)
    got = 0
    while got < n:
        msgs = await sub.fetch(500, timeout=5)
        if on_batch:
            await on_batch(len(msgs))
        for m in msgs:
            await m.ack()
        got += len(msgs)
    await js.delete_stream(stream)


async def two_hop_limit(settings: Settings, n: int) -> float:
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    db = await asyncpg.connect(settings.database_url)
    await db.execute("CREATE TEMP TABLE limit_files (id int PRIMARY KEY, status text)")
    await db.executemany("INSERT INTO limit_files VALUES ($1, 'PENDING')", [(i,) for i in range(n)])
    done = 0

    async def update(k: int) -> None:
        nonlocal done
        await db.execute("UPDATE limit_files SET status = 'SUCCEEDED' WHERE id = ANY($1::int[])", list(range(done, done + k)))
        done += k

    tag = uuid.uuid4().hex[:8].upper()
    started = time.perf_counter()
    await _hop(js, f"LIMIT_JOBS_{tag}", f"limit.{tag}.jobs", n)
    await _hop(js, f"LIMIT_RESULTS_{tag}", f"limit.{tag}.results", n, update)
    elapsed = time.perf_counter() - started
    await db.close()
    await nc.close()
    return n / elapsed
