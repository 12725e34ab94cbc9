"""`redrive inspect`: what `nats stream info`, `nats consumer info` and `nats micro ls` show."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import nats
import orjson

from shared.settings import Settings
from shared.subjects import Names


async def inspect_system(settings: Settings) -> dict:
    names = Names(settings.prefix)
    # Not bus.connect: that one waits out an outage forever, as a service should; a command
    # says at once that NATS does not answer.
    seen: list[BaseException] = []

    async def on_error(exc: BaseException) -> None:
        seen.append(exc)

    try:
        nc = await nats.connect(settings.nats_servers, name="redrive-inspect", connect_timeout=5, allow_reconnect=False,
                                max_reconnect_attempts=1, reconnect_time_wait=0.2, error_cb=on_error)
    except (nats.errors.NoServersError, TimeoutError) as exc:
        last = seen[-1] if seen else exc
        why = "no NATS answer within 5 s" if isinstance(last, TimeoutError) else str(last) or type(last).__name__
        where = ", ".join(_without_credentials(u) for u in settings.nats_servers)
        raise ConnectionError(f"cannot connect to NATS at {where}: {why}") from None
    try:
        js = nc.jetstream()
        streams = {}
        for stream, consumers in ((names.jobs_stream, [names.executor_consumer]),
                                  (names.events_stream, [names.results_consumer, names.notifier_consumer])):
            try:
                info = await js.stream_info(stream)
            except Exception as exc:
                streams[stream] = {"error": str(exc)}
                continue
            entry = {"messages": info.state.messages, "bytes": info.state.bytes, "consumers": {}}
            for consumer in consumers:
                try:
                    c = await js.consumer_info(stream, consumer)
                    entry["consumers"][consumer] = {"pending": c.num_pending, "ack_pending": c.num_ack_pending,
                                                    "redelivered": c.num_redelivered, "waiting": c.num_waiting}
                except Exception as exc:
                    entry["consumers"][consumer] = {"error": str(exc)}
            streams[stream] = entry
        services = []
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        await nc.publish("$SRV.INFO", b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + 0.5
        while True:
            try:
                msg = await sub.next_msg(timeout=max(0.01, deadline - asyncio.get_running_loop().time()))
            except Exception:
                break
            if not msg.data:  # "no responders" (no service runs), or an empty reply
                continue
            try:
                info = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                continue
            if info.get("name", "").startswith(f"{names.prefix}-"):
                services.append({"name": info["name"], "id": info["id"], "version": info.get("version"),
                                 "endpoints": [e["name"] for e in info.get("endpoints", [])]})
        await sub.unsubscribe()
        # Where it looked (credentials left out), so that a `nats` CLI can be pointed there too.
        return {"nats": [_without_credentials(u) for u in settings.nats_servers], "prefix": names.prefix,
                "streams": streams, "services": sorted(services, key=lambda s: s["name"])}
    finally:
        await nc.close()


def _without_credentials(url: str) -> str:
    """``nats://user:pass@host:4222`` → ``host:4222``."""
    return urlsplit(url if "://" in url else f"nats://{url}").netloc.rpartition("@")[2]
