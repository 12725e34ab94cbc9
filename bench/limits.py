"""The raw limit of redrive's two hops, done by hand on the same servers: (1) job: JetStream
publish, pull, ack; (2) result: publish, pull, ack, and a batched PostgreSQL update per
file. The best page of batching we can write, to compare the real system against.

Each hop is done twice over: with nats-py's own API (``publish_async``, ``fetch``) and
with the lean primitives the services use (shared/jetstream.py). The faster of the two is
the limit, so the services' own tricks cannot flatter the ratio.

The hops carry what the services' hops carry: a job and a file event of the bench's own
size (built by the services' own builders), with the same headers. A limit that carried
11-byte bodies measured the broker storing and sending next to nothing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from shared.bus import headers_for
from shared.jetstream import AckedPublisher, Puller
from shared.messages import Job, RetryPolicy
from shared.runtime import settle_gc
from shared.settings import Settings
from shared.subjects import Names


def _bench_messages() -> tuple[bytes, bytes, dict[str, str]]:
    """A job and its succeeded event as the bench's run sends them (one noop step, ids of
    real length), and their headers but for the message id."""
    from services.coordinator.jobs import job_messages
    from services.executor.file_events import file_event_body
    from services.executor.outcome import Outcome

    run = {"id": uuid.uuid4().hex, "tenant_id": uuid.uuid4().hex, "template_id": uuid.uuid4().hex,
           "mode": "per_file", "round": 0}
    job = job_messages(Names("bench"), run, {"steps": [{"name": "s", "handler": "noop"}]}, [{"idx": 1234, "name": "f1234"}],
                       RetryPolicy())[0]
    _, event = file_event_body(Job.model_validate_json(job.data), 1234, Outcome("succeeded", 0, output={}), 1, "succeeded")
    headers = headers_for("", run["tenant_id"], run["id"], run["id"])
    del headers["Nats-Msg-Id"]
    return job.data, event, headers


JOB, EVENT, HEADERS = _bench_messages()


async def _drain(fetch, n: int, on_batch) -> None:
    """Pull n messages in batches of 500, hand each batch's size to on_batch, ack each."""
    got = 0
    while got < n:
        msgs = await fetch(500, timeout=5)
        await on_batch(len(msgs))
        for m in msgs:
            await m.ack()
        got += len(msgs)


async def _hop_nats_py(nc, js, stream: str, subject: str, body: bytes, n: int, on_batch) -> None:
    futures = [await js.publish_async(subject, body, headers={**HEADERS, "Nats-Msg-Id": f"{stream}-{i}"})
               for i in range(n)]
    await asyncio.gather(*futures)
    sub = await js.pull_subscribe(subject, durable=f"{stream}-c", stream=stream)
    await _drain(sub.fetch, n, on_batch)


async def _hop_lean(nc, js, stream: str, subject: str, body: bytes, n: int, on_batch) -> None:
    publisher = AckedPublisher(nc)
    futures = [await publisher.publish(subject, body, {**HEADERS, "Nats-Msg-Id": f"{stream}-{i}"}) for i in range(n)]
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
    await hop(nc, js, *streams[0], JOB, n, nothing)
    await hop(nc, js, *streams[1], EVENT, n, update)
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
    nc = await nats.connect(settings.nats_servers)
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
