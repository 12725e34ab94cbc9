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
                                  (names.events_stream, [names.results_consumer, names.notifier_consumer]),
                                  (names.advisories_stream, [names.advisories_consumer])):
            try:
                info = await js.stream_info(stream)
            except Exception as exc:
                streams[stream] = {"error": str(exc)}
                continue
            entry = {**_stream_config(info.config), "messages": info.state.messages, "bytes": info.state.bytes,
                     "first_seq": info.state.first_seq, "last_seq": info.state.last_seq, "consumers": {}}
            for consumer in consumers:
                try:
                    c = await js.consumer_info(stream, consumer)
                    entry["consumers"][consumer] = {
                        **_consumer_config(c.config), "pending": c.num_pending, "ack_pending": c.num_ack_pending,
                        "redelivered": c.num_redelivered, "waiting": c.num_waiting,
                        "delivered_stream_seq": c.delivered.stream_seq if c.delivered else None,
                        "ack_floor_stream_seq": c.ack_floor.stream_seq if c.ack_floor else None}
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


def _value(v):
    return getattr(v, "value", v)  # nats-py's enums (retention, storage, ack policy) as the server names them


def _stream_config(c) -> dict:
    """What `nats stream info` shows of a stream's configuration (durations in seconds)."""
    return {"subjects": c.subjects, "retention": _value(c.retention), "storage": _value(c.storage),
            "replicas": c.num_replicas, "max_age_s": c.max_age, "duplicate_window_s": c.duplicate_window,
            "max_msg_size": c.max_msg_size}


def _consumer_config(c) -> dict:
    """What `nats consumer info` shows of a consumer's configuration (durations in seconds)."""
    return {"filter_subjects": c.filter_subjects or ([c.filter_subject] if c.filter_subject else []),
            "ack_policy": _value(c.ack_policy), "ack_wait_s": c.ack_wait, "max_deliver": c.max_deliver,
            "backoff_s": c.backoff, "max_ack_pending": c.max_ack_pending}


def render(found: dict) -> str:
    """The plain-text view (``--json`` prints ``found`` itself)."""
    lines = [f"NATS {', '.join(found['nats'])}  prefix {found['prefix']}", ""]
    for name, s in found["streams"].items():
        if "error" in s:
            lines += [f"Stream {name}: {s['error']}", ""]
            continue
        lines.append(f"Stream {name}  subjects {', '.join(s['subjects'] or [])}  {s['retention']}, {s['storage']}, "
                     f"replicas {s['replicas']}, max age {_duration(s['max_age_s'])}, "
                     f"duplicate window {_duration(s['duplicate_window_s'])}")
        lines.append(f"  messages {s['messages']:,}  bytes {s['bytes']:,}  first seq {s['first_seq']}  "
                     f"last seq {s['last_seq']}")
        for cname, c in s["consumers"].items():
            if "error" in c:
                lines.append(f"  Consumer {cname}: {c['error']}")
                continue
            backoff = f", backoff {', '.join(_duration(b) for b in c['backoff_s'])}" if c["backoff_s"] else ""
            lines.append(f"  Consumer {cname}  filter {', '.join(c['filter_subjects']) or '-'}  ack {c['ack_policy']}, "
                         f"ack wait {_duration(c['ack_wait_s'])}, max deliver {_count(c['max_deliver'])}, "
                         f"max ack pending {c['max_ack_pending']}{backoff}")
            lines.append(f"    pending {c['pending']:,}  ack pending {c['ack_pending']:,}  redelivered "
                         f"{c['redelivered']:,}  waiting pulls {c['waiting']}  delivered seq {c['delivered_stream_seq']}  "
                         f"ack floor {c['ack_floor_stream_seq']}")
        lines.append("")
    lines.append("Services" if found["services"] else "Services: none answered")
    for svc in found["services"]:
        lines.append(f"  {svc['name']}  {svc['version'] or ''}  id {svc['id']}  endpoints {', '.join(svc['endpoints'])}")
    return "\n".join(lines)


def _count(n: int | None) -> str:
    return "unlimited" if n is None or n < 0 else str(n)  # as the server writes "none": -1


def _duration(seconds: float | None) -> str:
    if not seconds:
        return "unlimited" if seconds in (0, None) else "0s"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _without_credentials(url: str) -> str:
    """``nats://user:pass@host:4222`` → ``host:4222``."""
    return urlsplit(url if "://" in url else f"nats://{url}").netloc.rpartition("@")[2]
