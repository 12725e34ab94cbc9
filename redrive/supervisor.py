"""`redrive up`: servers (embedded unless NATS_URL / DATABASE_URL say otherwise),
migrations, a platform admin key, and the five services, each its own OS process,
restarted when one dies, as is an embedded server (on its port, with its data: the
services reconnect by themselves). Ctrl-C stops everything, services first, servers last."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from redrive.service_log import ServiceLog
from redrive.watched import ANSI, Child, Server
from shared.settings import Settings

SERVICES = ("coordinator", "billing", "notifier", "executor", "gateway")


# A service's exit code for a configuration it cannot run with (redrive/cli_common.py): before
# the stack is ready, restarting it would only fail again.
BAD_CONFIGURATION = 2


class DataDirInUse(Exception):
    """Another `redrive up` runs on this data directory."""


def lock_data_dir(data_dir: Path):
    """Hold ``data_dir/up.lock`` for as long as this process lives (the returned file must be
    kept open): a second `redrive up` on the same directory would start a second nats-server
    on the live JetStream store, which it then "recovers" under the first one's feet."""
    import fcntl

    lock = open(data_dir / "up.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise DataDirInUse(f"{data_dir} is in use by another `redrive up` (pid {holder}); stop it first "
                           "(Ctrl-C), or give this one another --data-dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


class ServiceFailed(Exception):
    """A service stopped at its start on its configuration; the message says which and why."""

    def __init__(self, message: str, log_path: Path) -> None:
        super().__init__(message)
        self.log_path = log_path


@dataclass
class Stack:
    settings: Settings
    executors: int = 1
    children: list[Child] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)  # the embedded ones: those `up` owns
    not_ready: str = ""  # what wait_ready still waited for when it gave up

    def start_servers(self) -> Settings:
        s = self.settings
        s.data_dir.mkdir(parents=True, exist_ok=True)
        updates = {}
        if not _env_set("NATS_URL"):
            from shared.embedded import EmbeddedNats

            nats = EmbeddedNats(s.data_dir, port=_saved_port(s, "nats_url"), die_with_parent=True)
            self._add_server("nats-server", nats)
            updates["nats_url"] = nats.url
        if not _env_set("DATABASE_URL"):
            from shared.embedded import EmbeddedPostgres

            pg = EmbeddedPostgres(s.data_dir)
            self._add_server("postgres", pg)
            updates["database_url"] = pg.url
        self.settings = s.model_copy(update=updates)
        return self.settings

    def _add_server(self, name: str, server) -> None:
        watched = Server(name, server)
        self.servers.append(watched)  # first: stop() stops it even if its start failed half-way
        server.start()
        watched.started()

    def write_runtime(self, api_url: str) -> None:
        s = self.settings
        # The prefix too: a command given only the data dir must see this stack's streams.
        body = json.dumps({"nats_url": s.nats_url, "database_url": s.database_url,
                           "api_url": api_url, "prefix": s.prefix, "pid": os.getpid()}, indent=2)
        # Readable by its owner only, as admin.key: a DATABASE_URL may carry a password.
        fd = os.open(s.runtime_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a file left by an earlier `up` keeps its mode otherwise
        with os.fdopen(fd, "w") as out:
            out.write(body)

    def start_services(self) -> None:
        env = dict(os.environ)
        env.update({"NATS_URL": self.settings.nats_url, "DATABASE_URL": self.settings.database_url,
                    "REDRIVE_DATA_DIR": str(self.settings.data_dir), "REDRIVE_PREFIX": self.settings.prefix,
                    "REDRIVE_HOST": self.settings.host, "REDRIVE_PORT": str(self.settings.port)})
        for name in SERVICES:
            for i in range(self.executors if name == "executor" else 1):
                label = f"{name}-{i}" if name == "executor" else name
                self.start_child(label, [sys.executable, "-m", "redrive", "service", name], env)

    def start_child(self, label: str, args: list[str], env: dict[str, str]) -> Child:
        """Start ``args`` as a child watched by this stack, its output in DATA_DIR/logs/<label>.log
        rotated at REDRIVE_LOG_MAX_MB into REDRIVE_LOG_BACKUPS older files."""
        s = self.settings
        logs = s.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        log = ServiceLog(logs / f"{label}.log", int(s.log_max_mb * 2**20), s.log_backups)
        child = Child(label, args, env, log)
        self.children.append(child)  # first: stop() closes its log even if it did not start
        child.start()
        return child

    def watch(self, stop_requested) -> None:
        """Restart a service or embedded server that died (with a short backoff if it keeps dying)."""
        while not stop_requested():
            self._restart_dead_servers()
            self._restart_dead()
            time.sleep(0.2)

    def wait_ready(self, api_url: str, stop_requested, timeout: float = 60.0) -> bool:
        """Wait until the gateway answers /readyz (it and NATS and PostgreSQL are up) and
        every service behind it answers on the bus (a request that reached a service still
        starting was a 503), restarting services that die meanwhile; False after ``timeout``
        (``not_ready`` then says what was missing) or a stop request. A service that exits
        with BAD_CONFIGURATION meanwhile raises ServiceFailed: it would only fail again."""
        deadline = time.monotonic() + timeout
        behind = sorted({child.name.split("-")[0] for child in self.children} - {"gateway"})
        self.not_ready = "the gateway did not answer /readyz"
        while time.monotonic() < deadline and not stop_requested():
            try:
                with urllib.request.urlopen(f"{api_url}/readyz", timeout=1):
                    answering = asyncio.run(_answering(self.settings, behind))
                    if answering == set(behind):
                        return True
                    silent = ", ".join(name for name in behind if name not in answering)
                    self.not_ready = f"no answer on NATS from {silent}"
            except OSError as exc:  # not listening yet, or 503 (urllib's HTTPError is an OSError)
                self.not_ready = f"the gateway did not answer /readyz ({getattr(exc, 'code', None) or exc})"
            self._restart_dead_servers()
            self._restart_dead(starting=True)
            time.sleep(0.2)
        return False

    def _restart_dead(self, starting: bool = False) -> None:
        """Each dead service again after its backoff: scheduled, not slept, so one that keeps
        dying (10 s apart) does not hold back the others' restarts."""
        for child in self.children:
            if child.retry_at is not None:
                if time.monotonic() >= child.retry_at:
                    child.retry_at = None
                    child.restarts += 1  # counted when it starts again
                    child.start()
                continue
            if child.proc is not None and child.proc.poll() is not None:
                child.ended()
                if starting and child.proc.returncode == BAD_CONFIGURATION:
                    raise ServiceFailed(f"{child.name} could not start (exit {BAD_CONFIGURATION}): {child.last_error()}",
                                        child.log_path)
                quick = time.monotonic() - child.started_at < 5
                delay = min(10.0, 0.5 * (2 ** min(child.restarts + 1, 5))) if quick else 0.2
                print(f"redrive: {child.name} exited ({child.proc.returncode}); restarting in {delay:.1f}s", flush=True)
                child.retry_at = time.monotonic() + delay

    def _restart_dead_servers(self) -> None:
        """Start again, on its port and with its data, an embedded server that is gone (kill -9,
        OOM, ...): the services wait for it and reconnect. Backoff as for services; a start
        that fails (its port taken meanwhile, ...) is said and tried again later, `up` goes on."""
        for watched in self.servers:
            if watched.restarting is not None:  # PostgreSQL takes its time: the services' restarts go on meanwhile
                if watched.restarting.is_alive():
                    continue
                self._report_restart(watched)
                continue
            if (how := watched.gone()) is not None:
                quick = time.monotonic() - watched.started_at < 5
                watched.restarts += 1
                delay = min(10.0, 0.5 * (2 ** min(watched.restarts, 5))) if quick else 0.2
                print(f"redrive: {watched.name} {how}; restarting in {delay:.1f}s", flush=True)
                watched.retry_at = time.monotonic() + delay
            if watched.retry_at is None or time.monotonic() < watched.retry_at:
                continue  # not before its delay: the services' restarts go on meanwhile
            watched.restart_in_background()

    @staticmethod
    def _report_restart(watched: Server) -> None:
        failure, watched.restarting, watched.failure = watched.failure, None, None
        if failure is None:
            print(f"redrive: {watched.name} restarted (pid {watched.pid})", flush=True)
            return
        watched.restarts += 1
        delay = min(10.0, 0.5 * (2 ** min(watched.restarts, 5)))
        print(f"redrive: {watched.name} could not be restarted: {_why(failure)}; trying again in {delay:.1f}s",
              flush=True)
        watched.retry_at = time.monotonic() + delay

    def stop(self) -> None:
        for watched in self.servers:  # a restart under way ends first: then it is stopped below
            if watched.restarting is not None:
                watched.restarting.join(60)
        for child in reversed(self.children):
            child.stop()
            child.log.close()
        for watched in reversed(self.servers):
            try:
                watched.server.stop()
            except Exception:
                pass




def _why(exc: Exception) -> str:
    """One line from a server's start error (its first line, then the tail of its log): the
    first line and the last that says why ("address already in use" first, else a FATAL...)."""
    lines = [ANSI.sub("", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line] or [type(exc).__name__]
    for pattern in (r"in use", r"FATAL|FTL|PANIC|ERROR|[Ee]rror"):
        if said := [line for line in lines[1:] if re.search(pattern, line)]:
            return f"{lines[0].rstrip(':')}: {said[-1]}"
    return lines[0]


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
