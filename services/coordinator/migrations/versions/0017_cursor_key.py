"""coordinator: the key of the timeline's cursors

A page of a run's timeline ended with ``next_cursor`` = the ``id`` of its last entry: a
bigserial every tenant shares, so the gap between two cursors of a run was how many entries
the other runs (other tenants') got meanwhile. The cursor now carries that id enciphered
(shared/opaque_cursor.py) under this key: 32 random bytes drawn here, once per deployment,
in this schema so that every replica of the coordinator reads the same one.
``gen_random_uuid()`` is core PostgreSQL 13+ and drawn from its strong random source: two
of them, less their version bits, are 244 random bits. One row: ``single`` can only be true.

Revision ID: c0017
"""
from alembic import op

from shared.migrations import execute_script

revision = "c0017"
down_revision = "c0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    CREATE TABLE coordinator.cursor_key (
        single boolean PRIMARY KEY DEFAULT true CHECK (single),
        key bytea NOT NULL CHECK (length(key) = 32)
    );
    INSERT INTO coordinator.cursor_key (key)
        VALUES (decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))
    """)


def downgrade() -> None:
    op.execute("DROP TABLE coordinator.cursor_key")
