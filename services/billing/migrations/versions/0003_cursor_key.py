"""billing: the key of the ledger list's cursors

A page of the ledger ended with ``next_cursor`` = the ``id`` of its last entry: a bigserial
every tenant shares, so the gap between two of a tenant's cursors was how many entries the
other tenants made meanwhile (7 charges of theirs: 19 − 11 − 1). The cursor now carries
that id enciphered (shared/opaque_cursor.py) under this key: 32 random bytes drawn here,
once per deployment, in this schema so that every replica of billing reads the same one
(a cursor one replica gave is read by another). ``gen_random_uuid()`` is core PostgreSQL
13+ and drawn from its strong random source: two of them, less their version bits, are
244 random bits. One row: ``single`` can only be true.

Revision ID: b0003
"""
from alembic import op

from shared.migrations import execute_script

revision = "b0003"
down_revision = "b0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    CREATE TABLE billing.cursor_key (
        single boolean PRIMARY KEY DEFAULT true CHECK (single),
        key bytea NOT NULL CHECK (length(key) = 32)
    );
    INSERT INTO billing.cursor_key (key)
        VALUES (decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'))
    """)


def downgrade() -> None:
    op.execute("DROP TABLE billing.cursor_key")
