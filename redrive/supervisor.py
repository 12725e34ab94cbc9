"""`redrive up`: servers (embedded unless NATS_URL / DATABASE_URL say otherwise),
migrations, a platform admin key, and the five services, each its own OS process,
restarted when one dies. Ctrl-C stops everything, services first, servers last."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import Settings

SERVICES = ("coordinator", "billing", "notifier", "executor", "gateway")


@dataclass
class Child:
    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()
        log.close()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Stack:
    settings: Settings
    executors: int = 1
    children: list[Child] = field(default_factory=list)
    servers: list = field(default_factory=list)

    def start_servers(self) -> Settings:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        updates = {}
        if not _env_set("NATS_URL"):
            from shared.embedded import EmbeddedNats

            nats = EmbeddedNats(s.data_dir, port=_saved_port(s, "nats_url"))
            nats.start()
            self.servers.append(nats)
            updates["nats_url"] = nats.url
        if not _env_set("DATABASE_URL"):
            from shared.embedded import EmbeddedPostgres

            pg = EmbeddedPostgres(s.data_dir)
            pg.start()
            self.servers.append(pg)
            updates["database_url"] = pg.url
        self.settings = s.model_copy(update=updates)
        return self.settings

    def write_runtime(self, api_url: str) -> None:
        s = self.settings
        s.runtime_file.write_text(json.dumps({"nats_url": s.nats_url, "database_url": s.database_url,
                                              "api_url": api_url, "pid": os.getpid()}, indent=2))

    def start_services(self) -> None:
        env = dict(os.environ)
        env.update({"NATS_URL": self.settings.nats_url, "DATABASE_URL": self.settings.database_url,
                    "REDRIVE_DATA_DIR": str(self.settings.data_dir), "REDRIVE_PREFIX": self.settings.prefix,
                    "REDRIVE_HOST": self.settings.host, "REDRIVE_PORT": str(self.settings.port)})
        logs = self.settings.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        for name in SERVICES:
            for i in range(self.executors if name == "executor" else 1):
                label = f"{name}-{i}" if name == "executor" else name
                child = Child(label, [sys.executable, "-m", "redrive", "service", name], env, logs / f"{label}.log")
                child.start()
                self.children.append(child)

    def watch(self, stop_requested) -> None:
        """Restart a service that died (with a short backoff if it keeps dying)."""
        while not stop_requested():
            self._restart_dead()
            time.sleep(0.2)

    def wait_ready(self, api_url: str, stop_requested, timeout: float = 60.0) -> bool:
        """Wait until the gateway answers /readyz (it and NATS and PostgreSQL are up) and
        every service behind it answers on the bus (a request that reached a service still
        starting was a 503), restarting services that die meanwhile; False after ``timeout``
        or a stop request."""
        deadline = time.monotonic() + timeout
        behind = sorted({child.name.split("-")[0] for child in self.children} - {"gateway"})
        while time.monotonic() < deadline and not stop_requested():
            try:
                with urllib.request.urlopen(f"{api_url}/readyz", timeout=1):
                    if asyncio.run(_answering(self.settings, behind)) == set(behind):
                        return True
            except OSError:  # not listening yet, or 503 (urllib's HTTPError is an OSError)
                pass
            self._restart_dead()
            time.sleep(0.2)
        return False

    def _restart_dead(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is not None:
                quick = time.monotonic() - child.started_at < 5
                child.restarts += 1
                delay = min(10.0, 0.5 * (2 ** min(child.restarts, 5))) if quick else 0.2
                print(f"redrive: {child.name} exited ({child.proc.returncode}); restarting in {delay:.1f}s", flush=True)
                time.sleep(delay)
                child.start()

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()
        for server in reversed(self.servers):
            try:
                server.stop()
            except Exception:
                pass


def _env_set(name: str) -> bool:
    return bool(os.environ.get(name) or os.environ.get(f"REDRIVE_{name}"))


def _saved_port(settings: Settings, key: str) -> int | None:
    try:
        url = json.loads(settings.runtime_file.read_text()).get(key) or ""
        return int(url.rsplit(":", 1)[1].split("/")[0])
    except Exception:
        return None


async def _answering(settings: Settings, services: list[str]) -> set[str]:
    """The services among ``services`` that answer a NATS micro ping now."""
    import nats

    try:
        nc = await nats.connect(settings.nats_servers, connect_timeout=1, allow_reconnect=False,
                                max_reconnect_attempts=0)
    except Exception:  # not up yet
        return set()
    found = set()
    try:
        for name in services:
            try:
                await nc.request(f"$SRV.PING.{settings.prefix}-{name}", b"", timeout=0.5)
                found.add(name)
            except Exception:  # no responders yet, or slow: ask again next time
                pass
    finally:
        await nc.close()
    return found
