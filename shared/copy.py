"""Bulk inserts with PostgreSQL's COPY, inside the caller's SQLAlchemy transaction.

A 10,000-file run writes 10,000 file rows and 10,000 outbox rows in the transaction that
creates it; COPY does that in one round trip instead of batches of INSERTs."""

from __future__ import annotations

from typing import Iterable, Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

# Below this many rows a plain INSERT is as fast and simpler to read in logs.
COPY_THRESHOLD = 200


async def copy_rows(conn: AsyncConnection, schema: str, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> None:
    raw = await conn.get_raw_connection()
    await raw.driver_connection.copy_records_to_table(table, schema_name=schema, columns=list(columns), records=rows)
