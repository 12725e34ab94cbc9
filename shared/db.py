"""PostgreSQL plumbing: one async engine per process, transactions, and the error edge.

Domain code never sees asyncpg or SQLAlchemy exceptions: :func:`database_errors` turns
them into :class:`shared.errors.TransientError` (connection lost, serialization failure,
deadlock, resources, admin shutdown) or lets real bugs through.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from shared.errors import TransientError, is_transient_sqlstate, prepared_before_a_migration, sqlstate_of
from shared.settings import Settings


# A pooled connection idle longer than this is pinged before use (see _ping_when_idle).
PING_AFTER_IDLE_S = 1.0


def make_engine(settings: Settings, *, pool_size: int = 10, application_name: str = "redrive",
                command_timeout_s: float | None = None) -> AsyncEngine:
    """``command_timeout_s``: the longest a statement, or the wait for a pooled connection,
    may take before it fails as a TransientError. For a process that answers people (the
    gateway): a PostgreSQL that is frozen, not down, would otherwise hold every request."""
    connect_args: dict = {"server_settings": {"application_name": application_name, "jit": "off"}, "timeout": 10}
    limits: dict = {}
    if command_timeout_s is not None:
        connect_args["command_timeout"] = command_timeout_s
        limits["pool_timeout"] = command_timeout_s
    engine = create_async_engine(
        settings.sqlalchemy_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_recycle=1800,
        # jit off: our statements are short OLTP ones, and PostgreSQL's JIT, which starts on
        # plans its estimates call costly (reading a big run's files in a big table), added
        # 2.5-33 ms to statements that run in a few (scale audit, 20M file rows).
        connect_args=connect_args,
        **limits,
    )
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: AsyncEngine) -> None:
    """Pessimistic disconnect handling, for connections that sat idle only.

    ``pool_pre_ping`` pings on every checkout, and the asyncpg dialect's ping is three
    round trips (BEGIN, an empty query, ROLLBACK): 5% of the coordinator's CPU and
    PostgreSQL's on the bench, whose loops take a connection many times a second. A
    connection given back less than a second ago was alive then; one idle for longer (a
    PostgreSQL restart may have closed it) is pinged, and replaced when the ping fails
    (DisconnectionError: the pool retries with a fresh one). A connection that died within
    that second fails its statement, which is a TransientError to the caller, and
    SQLAlchemy then invalidates the pool's older connections at once.
    """
    pool = engine.sync_engine.pool

    @event.listens_for(pool, "checkin")
    def _given_back(dbapi_connection, record) -> None:
        record.info["given_back_at"] = time.monotonic()

    @event.listens_for(pool, "checkout")
    def _taken(dbapi_connection, record, proxy) -> None:
        given_back = record.info.get("given_back_at")
        if given_back is None or time.monotonic() - given_back < PING_AFTER_IDLE_S:
            return  # new (just connected), or in use a moment ago
        try:
            dbapi_connection.ping()
        except Exception as exc:
            raise DisconnectionError(f"pooled connection is dead: {type(exc).__name__}") from exc


def is_transient_db_error(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, ConnectionError, PoolTimeout)):  # PoolTimeout: no connection free in time
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, (InterfaceError,)):
            return True
        state = sqlstate_of(exc)
        if state is None:
            return isinstance(exc, OperationalError)
        return is_transient_sqlstate(state) or prepared_before_a_migration(exc)
    return False


@asynccontextmanager
async def database_errors() -> AsyncIterator[None]:
    try:
        yield
    except BaseException as exc:
        if is_transient_db_error(exc):
            raise TransientError(f"database unavailable: {type(exc).__name__}") from exc
        raise


@asynccontextmanager
async def transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that commits when the block ends and rolls back on any exception."""
    async with database_errors():
        async with engine.begin() as conn:
            yield conn


async def ping(engine: AsyncEngine) -> bool:
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


async def delete_in_batches(engine: AsyncEngine, statement, params: dict, *, batch: int,
                            max_batches: int) -> tuple[int, bool]:
    """Run a ``DELETE … LIMIT :batch`` statement one transaction at a time until it deletes
    fewer than ``batch`` rows: (rows deleted, whether some are left after ``max_batches``).
    Retention prunes use it, so a prune never holds a long transaction and one pass is
    short however far behind it is."""
    deleted = 0
    for _ in range(max_batches):
        async with transaction(engine) as conn:
            n = (await conn.execute(statement, {**params, "batch": batch})).rowcount
        deleted += n
        if n < batch:
            return deleted, False
    return deleted, True
