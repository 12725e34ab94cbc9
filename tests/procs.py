"""A multi-process redrive for fault tests: every service is its own OS process
(`python -m redrive service NAME`), so a test can kill -9 any of them, restart it, or
stop the servers under them. A watcher restarts services that die, like `redrive up`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from shared.embedded import free_port
from shared.settings import Settings
from tests.stack import Stack

ALL = ("billing", "coordinator", "notifier", "executor", "gateway")


class ProcStack(Stack):
    def __init__(self, settings: Settings, *, executors: int = 1, coordinators: int = 1, env: dict | None = None,
                 restart_dead: bool = True) -> None:
        super().__init__(settings)
        self.counts = {"executor": executors, "coordinator": coordinators}
        self.extra_env = env or {}
        self.restart_dead = restart_dead
        self.procs: dict[str, list[subprocess.Popen]] = {}
        self.deaths: dict[str, int] = {}
        self.port = free_port()
        self._watch: asyncio.Task | None = None
        self.logs = settings.data_dir / "logs"

    def _env(self) -> dict:
        s = self.settings
        env = {**os.environ, "NATS_URL": s.nats_url, "DATABASE_URL": s.database_url, "REDRIVE_PREFIX": s.prefix,
               "REDRIVE_DATA_DIR": str(s.data_dir), "REDRIVE_PORT": str(self.port), "REDRIVE_LOG_LEVEL": "INFO"}
        for field in ("executor_ack_wait_s", "executor_max_deliver", "recovery_interval_s", "recovery_lease_s",
                      "credit_intent_timeout_s", "recovery_max_failures", "executor_keepalive", "handlers",
                      "executor_concurrency", "request_timeout_s", "executor_allow_crash",
                      "executor_allow_private_urls", "results_ack_wait_s"):
            env[f"REDRIVE_{field.upper()}"] = str(getattr(s, field))
        env.update(self.extra_env)
        return env

    def spawn(self, name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "redrive", "service", name], env=self._env(),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.setdefault(name, []).append(proc)
        return proc

    async def start(self, *names: str, executors: int | None = None) -> "ProcStack":
        for name in names or ALL:
            for _ in range(self.counts.get(name, 1)):
                self.spawn(name)
        from shared import bus
        from shared.rpc import RpcClient

        self.nc = await bus.connect(self.settings, "test-client")
        self.js = self.nc.jetstream()
        # A question sent as a service is killed gets no answer: the polls that follow a kill
        # (wait_run) must not wait 30 s for it, which the scenarios' figures took for recovery.
        self.rpc = RpcClient(self.nc, self.names, timeout=5)
        try:
            await self.wait_services(*(n for n in (names or ALL) if n != "gateway"))
        except BaseException:
            # The test never gets the stack to stop: its processes would outlive the run
            # (seen: services of a failed start still polling servers long gone).
            await self.stop()
            raise
        if self.restart_dead:
            self._watch = asyncio.create_task(self._restart_dead())
        return self

    async def wait_services(self, *names: str, timeout: float = 60) -> None:
        """Until each named service answers a request (any answer, even a refusal)."""
        probes = {"billing": ("balance", {"tenant_id": "probe"}), "coordinator": ("list_templates", {"tenant_id": "probe"}),
                  "notifier": ("list", {"tenant_id": "probe"}), "executor": ("breakers", {})}
        from shared.messages import ServiceError

        deadline = time.monotonic() + timeout
        for name in names:
            verb, payload = probes[name]
            while True:
                try:
                    await self.rpc.call(name, verb, payload, timeout=1)
                    break
                except ServiceError as exc:
                    if exc.code != "service_unavailable":
                        break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} did not come up; see {self.logs}")
                await asyncio.sleep(0.1)

    async def _restart_dead(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            for name, procs in self.procs.items():
                for i, proc in enumerate(procs):
                    if proc.poll() is not None:
                        self.deaths[name] = self.deaths.get(name, 0) + 1
                        procs.pop(i)
                        self.spawn(name)
                        break

    def kill(self, name: str, index: int = 0) -> None:
        """kill -9: no shutdown code runs."""
        proc = self.procs[name][index]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def kill_all(self) -> None:
        for name in list(self.procs):
            for proc in self.procs[name]:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()

    async def stop(self) -> None:
        if self._watch:
            self._watch.cancel()
        await self.nc.close()
        for procs in self.procs.values():
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
        for procs in self.procs.values():
            for proc in procs:
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
