"""The raw limit of redrive's two hops, done by hand on the same servers: (1) job: JetStream
publish, pull, ack; (2) result: publish, pull, ack, and a batched PostgreSQL update per
file. The best page of batching we can write, to compare the real system against.

Each hop is done twice over: with nats-py's own API (``publish_async``, ``fetch``) and
with the lean primitives the services use (shared/jetstream.py). The faster of the two is
the limit, so the services' own tricks cannot flatter the ratio.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from shared.jetstream import AckedPublisher, Puller
from shared.runtime import settle_gc
from shared.settings import Settings

BODY = b'{"job":"x"}'


async def _drain(fetch, n: int, on_batch) -> None:
    """Pull n messages in batches of 500, hand each batch's size to on_batch, ack each."""
    got = 0
    while got < n:
        msgs = await fetch(500, timeout=5)
        await on_batch(len(msgs))
        for m in msgs:
            await m.ack()
        got += len(msgs)


async def _hop_nats_py(nc, js, stream: str, subject: str, n: int, on_batch) -> None:
    futures = [await js.publish_async(subject, BODY, headers={"Nats-Msg-Id": f"{stream}-{i}"}) for i in range(n)]
    await asyncio.gather(*futures)
    sub = await js.pull_subscribe(subject, durable=f"{stream}-c", stream=stream)
    await _drain(sub.fetch, n, on_batch)


async def _hop_lean(nc, js, stream: str, subject: str, n: int, on_batch) -> None:
    publisher = AckedPublisher(nc)
    futures = [await publisher.publish(subject, BODY, {"Nats-Msg-Id": f"{stream}-{i}"}) for i in range(n)]
    await asyncio.gather(*futures)
    await js.add_consumer(stream, ConsumerConfig(durable_name=f"{stream}-c", ack_policy=AckPolicy.EXPLICIT))
    puller = Puller(nc, stream, f"{stream}-c")
    await _drain(puller.fetch, n, on_batch)
    await puller.stop()


async def _two_hops(nc, js, db, hop, n: int) -> float:
    await db.execute("UPDATE limit_files SET status = 'PENDING'")
    done = 0

    async def nothing(k: int) -> None:
        pass

    async def update(k: int) -> None:
        nonlocal done
        await db.execute("UPDATE limit_files SET status = 'SUCCEEDED' WHERE id = ANY($1::int[])", list(range(done, done + k)))
        done += k

    tag = uuid.uuid4().hex[:8].upper()
    streams = [(f"LIMIT_JOBS_{tag}", f"limit.{tag}.jobs"), (f"LIMIT_RESULTS_{tag}", f"limit.{tag}.results")]
    for stream, subject in streams:
        await js.add_stream(StreamConfig(name=stream, subjects=[subject], retention=RetentionPolicy.WORK_QUEUE))
    started = time.perf_counter()
    await hop(nc, js, *streams[0], n, nothing)
    await hop(nc, js, *streams[1], n, update)
    elapsed = time.perf_counter() - started
    for stream, _ in streams:
        await js.delete_stream(stream)
    return n / elapsed


ServerCpu = Callable[[], dict[str, float]]


async def two_hop_limits(settings: Settings, n: int, server_cpu: ServerCpu | None = None) -> dict:
    """files/s of the two hops done by hand, per variant; ``limit`` is the best of them.
    ``cpu_us_per_file`` says, per variant, what a file cost this process and (when
    ``server_cpu`` reads them: CPU seconds by server) the servers."""
    settle_gc()  # as the services do once started: a fair comparison
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    db = await asyncpg.connect(settings.database_url)
    await db.execute("CREATE TEMP TABLE limit_files (id int PRIMARY KEY, status text)")
    await db.executemany("INSERT INTO limit_files VALUES ($1, 'PENDING')", [(i,) for i in range(n)])
    out: dict = {"cpu_us_per_file": {}}
    try:
        for name, hop in (("nats_py", _hop_nats_py), ("lean", _hop_lean)):
            servers_before, before = (server_cpu or dict)(), time.process_time()
            out[name] = await _two_hops(nc, js, db, hop, n)
            cpu = {"hops": time.process_time() - before}
            cpu.update({k: v - servers_before.get(k, 0) for k, v in (server_cpu or dict)().items()})
            out["cpu_us_per_file"][name] = {k: round(v / n * 1e6) for k, v in cpu.items()}
    finally:
        await db.close()
        await nc.close()
    out["limit"] = max(out["nats_py"], out["lean"])
    return out


def run(settings: Settings, n: int, server_cpu: ServerCpu | None = None) -> dict:
    """In a fresh event loop of the same kind the services use (uvloop when installed)."""
    try:
        import uvloop

        return uvloop.run(two_hop_limits(settings, n, server_cpu))
    except ImportError:
        return asyncio.run(two_hop_limits(settings, n, server_cpu))
