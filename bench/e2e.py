"""`redrive bench`: runs of N files through the real services (separate processes, real
NATS and PostgreSQL), each followed by the hand-written two-hop limit on the same servers.

Prints, per round and as a summary (the median round): files/s end to end, p50/p99
per-file latency (created → result recorded), CPU µs per file per process (the servers'
included, and the same for the limit), peak RSS per service, and the ratio to the limit."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import asyncpg
import psutil

from redrive.api_client import Api
from redrive.bootstrap_admin import create_key, create_tenant
from redrive.supervisor import Stack
from shared.embedded import free_port
from shared.migrations import migrate_sync
from shared.settings import Settings
from shared.subjects import Names


def main(files: int = 10_000, handler: str = "noop", executors: int = 1, data_dir: Path | None = None,
         repeat: int = 3, rounds_shown: bool = True) -> dict:
    """Prints a JSON line per round as it ends (unless ``rounds_shown`` is false: then the
    summary alone, one JSON document for scripts), then the summary."""
    scratch = data_dir is None
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="redrive-bench-"))
    port = free_port()
    # Its own subjects and streams unless told otherwise (REDRIVE_PREFIX), beside a system that
    # may share the servers.
    prefix = {} if os.environ.get("REDRIVE_PREFIX") else {"prefix": "bench"}
    stack = Stack(Settings(data_dir=data_dir, port=port, **prefix), executors=executors)
    peak: dict[str, int] = {}
    stop = threading.Event()
    try:
        settings = stack.start_servers()
        migrate_sync(settings)
        tenant = asyncio.run(create_tenant(settings, "bench", monthly=files * (repeat + 1)))
        key = asyncio.run(create_key(settings, tenant, "tenant_admin", "bench"))
        stack.start_services()
        api = Api(f"http://127.0.0.1:{port}", key)
        if not stack.wait_ready(api.base_url, lambda: False, timeout=30):
            raise SystemExit(f"the gateway did not become ready (see {data_dir}/logs)")

        def sample() -> None:
            while not stop.is_set():
                for child in stack.children:
                    try:
                        rss = psutil.Process(child.proc.pid).memory_info().rss
                        peak[child.name] = max(peak.get(child.name, 0), rss)
                    except (psutil.Error, AttributeError):
                        pass
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        template = api.call("POST", "/templates", {"name": "bench", "steps": [{"name": "s", "handler": handler}]})
        finished = _RunEvents(settings)  # awaits the run's terminal event instead of polling the API
        # This machine's neighbours come and go: each round measures the system and then the
        # limit back to back, and the summary takes the median round.
        rounds = []
        for i in range(repeat):
            rounds.append(_round(api, stack, settings, finished, template["id"], files, data_dir))
            if rounds_shown:
                print(json.dumps({"round": i + 1, **rounds[-1]}), flush=True)
        stop.set()
        finished.close()
        median = sorted(rounds, key=lambda r: r["ratio_to_limit"])[len(rounds) // 2]
        result = {
            "files": files, "handler": handler, "executors": executors, "rounds": repeat,
            "exact": all(r["exact"] for r in rounds),
            "files_per_s": [r["files_per_s"] for r in rounds],
            "two_hop_limit_files_per_s": [r["two_hop_limit_files_per_s"] for r in rounds],
            "ratio_to_limit": [r["ratio_to_limit"] for r in rounds],
            "median_round": median,
            "peak_rss_mb": {k: round(v / 2**20) for k, v in sorted(peak.items())},
        }
        print(json.dumps({**result, "every_round": rounds} if not rounds_shown else result, indent=2))
        return result
    finally:
        stop.set()
        stack.stop()
        if scratch:  # a throwaway system: leave nothing behind (PostgreSQL may live outside it)
            for watched in stack.servers:
                pgdata = getattr(watched.server, "pgdata", None)
                if pgdata is not None and data_dir.resolve() not in Path(pgdata).resolve().parents:
                    shutil.rmtree(pgdata, ignore_errors=True)
            shutil.rmtree(data_dir, ignore_errors=True)


def _round(api: Api, stack: Stack, settings: Settings, finished: "_RunEvents", template_id: str, files: int,
           data_dir: Path) -> dict:
    from bench import limits

    cpu_before = _cpu(stack)
    started, sent_at = time.perf_counter(), time.time()
    run = api.call("POST", "/workflow-runs", {"template_id": template_id, "files": [{"name": f"f{i}"} for i in range(files)]})
    accepted = time.perf_counter() - started
    if not finished.wait(run["id"], timeout=max(60.0, files / 200)):
        raise SystemExit(f"the run did not finish in time (see {data_dir}/logs)")
    elapsed = time.perf_counter() - started
    cpu = {k: round(v - cpu_before.get(k, 0), 2) for k, v in _cpu(stack).items()}
    status = api.call("GET", f"/workflow-runs/{run['id']}?file_limit=1")
    lat = asyncio.run(_latencies(settings.database_url, run["id"]))
    phases = asyncio.run(_phases(settings.database_url, run["id"], sent_at))
    exact = (status["status"] == "COMPLETED" and status["counts"]["succeeded"] == files
             and status["credits"]["consumed"] == files)
    limit = limits.run(settings, files, server_cpu=lambda: _cpu(stack, servers_only=True))
    variants = ("nats_py", "lean")
    steady = files / max(phases["last"] - phases["first"], 1e-3)  # first → last result: the pace, start-up aside
    return {
        "exact": exact, "seconds": round(elapsed, 2), "files_per_s": round(files / elapsed),
        "p50_ms": round(lat[0], 1), "p99_ms": round(lat[1], 1),
        # s after the POST was sent: the answer came (accepted), the coordinator had written
        # the run (created, its row's clock), its first and last file finished, its fan-in.
        "phases_s": {"accepted": round(accepted, 3), **phases},
        "steady_files_per_s": round(steady),
        "steady_ratio_to_limit": round(steady / limit["limit"], 2),
        # Where the time goes: what a file cost each process, here and in the limit.
        "cpu_us_per_file": {k: round(v / files * 1e6) for k, v in cpu.items()},
        "limit_cpu_us_per_file": limit["cpu_us_per_file"],
        "two_hop_limit_files_per_s": round(limit["limit"]),
        "limit_by_variant": {k: round(limit[k]) for k in variants},
        "ratio_by_variant": {k: round(files / elapsed / limit[k], 2) for k in variants},
        "ratio_to_limit": round(files / elapsed / limit["limit"], 2),  # the faster variant: the strict figure
    }


class _RunEvents:
    """Run events over core NATS, in a thread with its own loop: the bench waits for the
    run's terminal event instead of polling the API (polling would spend the coordinator's
    CPU, and so slow down what is being measured)."""

    TERMINAL = {"completed", "completed_with_errors", "failed", "cancelled"}

    def __init__(self, settings: Settings) -> None:
        self._finished: set[str] = set()
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        self._nc = asyncio.run_coroutine_threadsafe(self._subscribe(settings), self._loop).result(10)

    async def _subscribe(self, settings: Settings):
        import nats

        nc = await nats.connect(settings.nats_servers)
        await nc.subscribe(Names(settings.prefix).run_events_all, cb=self._on_event)
        await nc.flush()
        return nc

    async def _on_event(self, msg) -> None:
        if msg.subject.rsplit(".", 1)[-1] in self.TERMINAL:
            with self._changed:
                self._finished.add(json.loads(msg.data)["run_id"])
                self._changed.notify_all()

    def wait(self, run_id: str, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: run_id in self._finished, timeout)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


def _cpu(stack: Stack, servers_only: bool = False) -> dict[str, float]:
    """CPU seconds so far of each service process and of the embedded servers (with their
    children: PostgreSQL's backends)."""
    procs = {} if servers_only else {child.name: child.proc.pid for child in stack.children if child.proc}
    for watched in stack.servers:  # "nats-server", "postgres"
        if watched.server.pid:
            procs[watched.name] = watched.server.pid
    out = {}
    for name, pid in procs.items():
        try:
            parent = psutil.Process(pid)
            out[name] = sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])
        except psutil.Error:
            pass
    return out


async def _phases(database_url: str, run_id: str, sent_at: float) -> dict[str, float]:
    """Seconds after the POST was sent (one machine, one clock) at which the run's
    transaction began, its first and last file result was recorded, and fan-in fired."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT extract(epoch FROM r.created_at) AS created, extract(epoch FROM min(f.updated_at)) AS first, "
            " extract(epoch FROM max(f.updated_at)) AS last, extract(epoch FROM r.finished_at) AS finished "
            "FROM coordinator.files f JOIN coordinator.runs r ON r.id = f.run_id WHERE f.run_id = $1 "
            "GROUP BY r.created_at, r.finished_at", run_id)
    finally:
        await conn.close()
    return {k: round(float(row[k]) - sent_at, 3) for k in ("created", "first", "last", "finished")}


async def _latencies(database_url: str, run_id: str) -> tuple[float, float]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM f.updated_at - r.created_at) * 1000 AS ms FROM coordinator.files f "
            "JOIN coordinator.runs r ON r.id = f.run_id WHERE f.run_id = $1", run_id)
    finally:
        await conn.close()
    values = sorted(float(r["ms"]) for r in rows)
    return statistics.median(values), values[int(len(values) * 0.99) - 1]


if __name__ == "__main__":
    main()
