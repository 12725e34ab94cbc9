"""Chaos on a real 3-node NATS cluster (REDRIVE_STREAM_REPLICAS=3, NATS_URL naming all three
nodes, as the README's "scaling out" says): kill -9 the node that leads the jobs stream, the
executor's consumer and the events stream, and that the executor is connected to, in the
middle of a run. The services must reconnect to the other nodes and carry on; the run must
end with every file done once, nothing lost, nothing charged twice.

The cluster is always this test's own (NATS_URL is ignored); PostgreSQL is the usual one
(DATABASE_URL, else the session's server: tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from shared.rpc import RpcClient
from tests.chaos.conftest import FIGURES
from tests.chaos.invariants import check, wait_all_terminal
from tests.nats_cluster import NatsCluster, Node
from tests.procs import ProcStack
from tests.stack import drained

pytestmark = pytest.mark.chaos

FILES = 300
# Connection names the services give NATS (shared/bus.py connect).
CONNECTIONS = ("billing", "coordinator", "executor", "redrive-notifier")


@pytest.fixture
async def cluster(tmp_path):
    found = await NatsCluster(tmp_path / "nats-cluster").start()
    yield found
    found.stop()


async def lead_on(stack: ProcStack, node: Node, stream: str, consumer: str | None = None, timeout: float = 15) -> None:
    """Move the leadership of a stream (or of one of its consumers) to ``node``: a leader
    step-down with that node preferred, asked again until it leads."""
    api = f"CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}" if consumer else f"STREAM.LEADER.STEPDOWN.{stream}"
    deadline = time.monotonic() + timeout
    while True:
        info = await (stack.js.consumer_info(stream, consumer) if consumer else stack.js.stream_info(stream))
        if info.cluster and info.cluster.leader == node.name:
            return
        assert time.monotonic() < deadline, f"{consumer or stream} still led by {info.cluster and info.cluster.leader}"
        try:
            await stack.nc.request(f"$JS.API.{api}", json.dumps({"placement": {"preferred": node.name}}).encode(),
                                   timeout=2)
        except Exception:
            pass  # an election in progress: ask again
        await asyncio.sleep(0.2)


async def node_of(cluster: NatsCluster, connection: str) -> Node:
    for node in cluster.alive:
        if connection in await cluster.clients_on(node):
            return node
    raise AssertionError(f"no node holds a connection named {connection!r}")


async def all_connected_to(cluster: NatsCluster, nodes: list[Node], timeout: float = 20) -> None:
    """Until every service has a connection on one of ``nodes``."""
    deadline = time.monotonic() + timeout
    while True:
        names = [name for node in nodes for name in await cluster.clients_on(node)]
        missing = [c for c in CONNECTIONS if c not in names]
        if not missing:
            return
        assert time.monotonic() < deadline, f"not reconnected to the surviving nodes: {missing}"
        await asyncio.sleep(0.1)


async def test_a_nats_node_killed_mid_run(cluster, make_settings, tmp_path):
    settings = await make_settings(
        stream_replicas=3, recovery_interval_s=0.5, recovery_lease_s=4.0, credit_intent_timeout_s=1.0,
        executor_ack_wait_s=2.0, handlers="tests.chaos.handlers", request_timeout_s=5, executor_concurrency=16)
    settings = settings.model_copy(update={"nats_url": cluster.url})  # the cluster, whatever NATS_URL says
    stack = ProcStack(settings, env={"REDRIVE_STREAM_REPLICAS": "3"})
    try:
        await stack.start("billing", "coordinator", "notifier", "executor")
        # A request this client sent just as its node died is lost with the connection and
        # waits out its whole timeout (30 s in ProcStack): poll with the services' own.
        stack.rpc = RpcClient(stack.nc, stack.names, timeout=settings.request_timeout_s)
        names = stack.names
        info = await stack.js.stream_info(names.jobs_stream)
        assert info.config.num_replicas == 3 and len(info.cluster.replicas) == 2  # really replicated

        # The victim: the executor's node, made leader of what the run goes through.
        victim = await node_of(cluster, "executor")
        await lead_on(stack, victim, names.jobs_stream)
        await lead_on(stack, victim, names.jobs_stream, names.executor_consumer)
        await lead_on(stack, victim, names.events_stream)
        await lead_on(stack, victim, names.events_stream, names.results_consumer)
        survivors = [node for node in cluster.nodes if node is not victim]

        log = tmp_path / "steps.log"
        tenant = await stack.tenant(monthly=10_000)
        await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=5, backoff_base_ms=50,
                         backoff_max_ms=500, breaker_failure_threshold=5, breaker_reset_s=1)
        steps = [{"name": f"s{i}", "handler": "chaos_step", "params": {"log": str(log), "sleep_ms": 100}}
                 for i in range(2)]
        template = await stack.template(tenant, steps)
        run_id = (await stack.submit(tenant, template, FILES))["id"]
        await stack.wait_run(tenant, run_id, until=lambda r: r["counts"]["succeeded"] >= FILES // 5)
        assert (await stack.run(tenant, run_id))["status"] == "RUNNING"  # the kill lands mid-run

        assert "executor" in await cluster.clients_on(victim)  # leaders moved, connections did not
        cluster.kill(victim)
        since = time.monotonic()
        await wait_all_terminal(stack, tenant, [run_id], timeout=60)
        figures = await check(stack, tenant, [run_id], step_log=log)
        FIGURES.append({"scenario": "kill -9 the leading NATS cluster node", **figures,
                        "recovery_s": time.monotonic() - since})

        run = await stack.run(tenant, run_id)
        assert run["status"] == "COMPLETED", run["counts"]
        assert run["counts"]["total"] == run["counts"]["succeeded"] == FILES
        charges = [e for e in await stack.ledger(tenant) if e["kind"] == "charge"]
        assert sum(-e["amount"] for e in charges) == FILES, charges[:3]
        # The services carried on: none died, each is connected to a surviving node, and the
        # jobs stream, led elsewhere now, holds nothing unfinished.
        assert stack.deaths == {}
        await all_connected_to(cluster, survivors)
        info = await stack.js.stream_info(names.jobs_stream)
        assert info.cluster.leader in {node.name for node in survivors}
        await drained(stack, names.jobs_stream, names.executor_consumer)
    finally:
        if hasattr(stack, "nc"):
            await stack.stop()
        stack.kill_all()  # whatever did not stop, or a start that failed half-way
