"""`redrive bench`: one run of N files through the real services (separate processes, real
NATS and PostgreSQL), then the hand-written two-hop limit on the same servers.

Prints files/s end to end, p50/p99 per-file latency (created → result recorded), peak RSS
per service, and the ratio to the limit."""

from __future__ import annotations

import asyncio
import json
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


def main(files: int = 10_000, handler: str = "noop", executors: int = 1, data_dir: Path | None = None) -> dict:
    scratch = data_dir is None
    data_dir = Path(data_dir or tempfile.mkdtemp(prefix="redrive-bench-"))
    port = free_port()
    stack = Stack(Settings(data_dir=data_dir, port=port, prefix="bench"), executors=executors)
    peak: dict[str, int] = {}
    stop = threading.Event()
    try:
        settings = stack.start_servers()
        migrate_sync(settings)
        tenant = asyncio.run(create_tenant(settings, "bench", monthly=files * 10))
        key = asyncio.run(create_key(settings, tenant, "tenant_admin", "bench"))
        stack.start_services()
        api = Api(f"http://127.0.0.1:{port}", key)
        _wait_ready(api)

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
        cpu_before = _cpu(stack)
        started = time.perf_counter()
        run = api.call("POST", "/workflow-runs", {"template_id": template["id"], "files": [{"name": f"f{i}"} for i in range(files)]})
        # The listing carries counts without the 10,000 file rows.
        deadline = time.monotonic() + max(60.0, files / 200)
        while (status := api.call("GET", "/workflow-runs?limit=1")["items"][0])["status"] == "RUNNING":
            if time.monotonic() > deadline:
                raise SystemExit(f"the run did not finish in time: {status['counts']} (see {data_dir}/logs)")
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu = {k: round(v - cpu_before.get(k, 0), 2) for k, v in _cpu(stack).items()}
        stop.set()
        lat = asyncio.run(_latencies(settings.database_url, run["id"]))
        exact = status["counts"]["succeeded"] == files and status["credits"]["consumed"] == files
        from bench.limits import two_hop_limit

        limit = asyncio.run(two_hop_limit(settings, files))
        result = {
            "files": files, "status": status["status"], "exact": exact, "seconds": round(elapsed, 2),
            "files_per_s": round(files / elapsed), "p50_ms": round(lat[0], 1), "p99_ms": round(lat[1], 1),
            "cpu_s": cpu,
            "peak_rss_mb": {k: round(v / 2**20) for k, v in sorted(peak.items())},
            "two_hop_limit_files_per_s": round(limit), "ratio_to_limit": round(files / elapsed / limit, 2),
        }
        print(json.dumps(result, indent=2))
        return result
    finally:
        stop.set()
        stack.stop()
        if scratch:  # a throwaway system: leave nothing behind (PostgreSQL may live outside it)
            for server in stack.servers:
                pgdata = getattr(server, "pgdata", None)
                if pgdata is not None and data_dir.resolve() not in Path(pgdata).resolve().parents:
                    shutil.rmtree(pgdata, ignore_errors=True)
            shutil.rmtree(data_dir, ignore_errors=True)


def _cpu(stack: Stack) -> dict[str, float]:
    out = {}
    for child in stack.children:
        try:
            t = psutil.Process(child.proc.pid).cpu_times()
            out[child.name] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _wait_ready(api: Api, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(api.base_url + "/readyz", timeout=1)
            return
        except Exception:
            time.sleep(0.2)
    raise RuntimeError("the gateway did not become ready")


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
