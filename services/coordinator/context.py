"""What command handlers need, gathered once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass, field

from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.handler_offers import OfferedHandlers
from shared.rpc import RpcClient
from shared.settings import Settings
from shared.subjects import Names
from services.coordinator.outbox import OutboxRelay
from services.coordinator.run_turns import RunTurns


@dataclass
class Deps:
    settings: Settings
    names: Names
    engine: AsyncEngine
    billing: RpcClient
    relay: OutboxRelay
    # The broker's max payload: a job bigger than that can never be published.
    max_payload: int = 1 << 20
    js: JetStreamContext | None = None  # the recovery sweep asks what the jobs stream holds
    handlers: OfferedHandlers | None = None  # what the executors offer (None: not known, accept all)
    executors: RpcClient | None = None  # asked to check a new template's step params
    turns: RunTurns = field(default_factory=RunTurns)  # actions on one file queue here (run_turns.py)
    # Credit intents' own connections (credits.py). A command holds one of ``engine``'s, with
    # its run locked, while it commits an intent: from the same pool, ~20 Continues at once
    # each held one and waited for a second, and every request and the results consumer
    # waited with them for the pool's timeout.
    credit_engine: AsyncEngine | None = None

    @property
    def credits_db(self) -> AsyncEngine:
        return self.credit_engine or self.engine
