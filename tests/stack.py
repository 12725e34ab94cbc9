"""An in-process redrive for integration tests: the real services (billing, coordinator,
executor, optionally notifier) built from their composition roots, over real NATS and
PostgreSQL, and a client that speaks to them over NATS request/reply."""

from __future__ import annotations

import asyncio
import time
import uuid

from shared import bus
from shared.messages import ServiceError
from shared.rpc import RpcClient
from shared.settings import Settings
from shared.subjects import Names


class Stack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.names = Names(settings.prefix)
        self.services: dict[str, list] = {}

    async def start(self, *names: str, executors: int = 1) -> "Stack":
        import importlib

        for name in names or ("billing", "coordinator", "executor"):
            for _ in range(executors if name == "executor" else 1):
                service = await importlib.import_module(f"services.{name}.bootstrap").build(self.settings)
                await service.start()
                self.services.setdefault(name, []).append(service)
        if not hasattr(self, "nc"):  # a second start() adds services to the same stack
            self.nc = await bus.connect(self.settings, "test-client")
            self.js = self.nc.jetstream()
            self.rpc = RpcClient(self.nc, self.names, timeout=30)
        return self

    async def stop(self) -> None:
        await self.nc.close()
        for name in reversed(list(self.services)):
            for service in self.services[name]:
                await service.stop()

    async def call(self, service: str, verb: str, **payload):
        return await self.rpc.call(service, verb, payload)

    async def tenant(self, monthly: int = 1000, purchased: int = 0) -> str:
        tenant_id = f"ten-{uuid.uuid4().hex[:8]}"
        await self.call("billing", "open_account", tenant_id=tenant_id, monthly_allowance=monthly, purchased=purchased)
        return tenant_id

    async def template(self, tenant_id: str, steps: list[dict], credits_per_file: int = 1, failure_policy="continue") -> str:
        t = await self.call("coordinator", "create_template", tenant_id=tenant_id, actor="test", name="t", steps=steps,
                            credits_per_file=credits_per_file, failure_policy=failure_policy)
        return t["id"]

    async def submit(self, tenant_id: str, template_id: str, n: int, **kw) -> dict:
        files = kw.pop("files", None) or [{"name": f"f{i}.txt"} for i in range(n)]
        return await self.call("coordinator", "create_run", tenant_id=tenant_id, actor="test", template_id=template_id,
                               files=files, **kw)

    async def run(self, tenant_id: str, run_id: str) -> dict:
        return await self.call("coordinator", "get_run", tenant_id=tenant_id, run_id=run_id)

    async def wait_run(self, tenant_id: str, run_id: str, until=lambda r: r["status"] != "RUNNING", timeout: float = 60) -> dict:
        """Poll the observable state until ``until`` holds (bounded; no fixed sleeps)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                run = await self.run(tenant_id, run_id)
            except ServiceError as exc:  # a service restarting (fault tests): ask again
                if exc.code != "service_unavailable" or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            if until(run):
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} did not reach the expected state: {run['status']} {run['counts']}")
            await asyncio.sleep(0.05)

    async def ledger(self, tenant_id: str) -> list[dict]:
        items, cursor = [], None
        while True:
            page = await self.call("billing", "ledger", tenant_id=tenant_id, limit=500, cursor=cursor)
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    async def assert_books_balance(self, tenant_id: str) -> None:
        """Ledger sum equals the balance; no idempotency key charged twice."""
        entries = await self.ledger(tenant_id)
        bal = await self.call("billing", "balance", tenant_id=tenant_id)
        assert sum(e["amount"] for e in entries) == bal["monthly"]["remaining"] + bal["purchased"]["remaining"]
        keys = [e["idempotency_key"] for e in entries if e["kind"] == "charge"]
        assert len(keys) == len(set(keys))


def counts_add_up(run: dict) -> bool:
    c = run["counts"]
    return c["total"] == sum(c[k] for k in ("pending", "succeeded", "failed", "errored", "skipped", "cancelled"))


async def expect_error(code: str, coro) -> ServiceError:
    try:
        await coro
    except ServiceError as exc:
        assert exc.code == code, f"expected {code}, got {exc.code}: {exc.message}"
        return exc
    raise AssertionError(f"expected ServiceError {code}")


async def drained(stack: "Stack", stream: str, consumer: str, timeout: float = 10):
    """Wait until the consumer has nothing pending and nothing unacked (every message acked
    or terminated); returns its info."""
    deadline = time.monotonic() + timeout
    while True:
        info = await stack.js.consumer_info(stream, consumer)
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"{consumer}: {info.num_pending} pending, {info.num_ack_pending} unacked")
        await asyncio.sleep(0.05)
