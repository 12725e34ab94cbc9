"""The bench charges CPU to each embedded server by name, with its children (PostgreSQL's backends)."""

import os
import types

from bench.e2e import _cpu
from redrive.watched import Server


def test_each_embedded_server_has_its_own_cpu_figure():
    me = types.SimpleNamespace(pid=os.getpid(), running=True)
    stack = types.SimpleNamespace(children=[], servers=[Server("nats-server", me), Server("postgres", me)])
    cpu = _cpu(stack, servers_only=True)
    assert set(cpu) == {"nats-server", "postgres"} and all(seconds > 0 for seconds in cpu.values())
