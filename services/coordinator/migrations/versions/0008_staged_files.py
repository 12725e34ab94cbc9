"""coordinator: files of a run sent ahead in parts (commands/staged_files.py)

A run body larger than one bus message reaches the coordinator as parts of its files
(``stage_files``), then as a ``create_run`` that names them; the run's transaction moves
them into ``files`` and deletes them here. Parts of a run that was never created are
pruned after a day (BRIN on ``staged_at``, as the inbox).

Revision ID: c0008
"""
from alembic import op

from shared.migrations import execute_script

revision = "c0008"
down_revision = "c0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    CREATE TABLE coordinator.staged_files (
        upload_id text NOT NULL,
        idx integer NOT NULL,
        tenant_id text NOT NULL,
        name text NOT NULL,
        url text,
        content_b64 text,
        size bigint,
        sha256 text,
        staged_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (upload_id, idx)
    );
    CREATE INDEX staged_files_staged_at ON coordinator.staged_files USING brin (staged_at) WITH (autosummarize = on);
    """)


def downgrade() -> None:
    op.execute("DROP TABLE coordinator.staged_files")
