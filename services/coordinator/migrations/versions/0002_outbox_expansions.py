"""coordinator: outbox rows that describe a run's jobs instead of carrying them

A run's first publication used to write one outbox row per job inside the creating
transaction (10,000 job bodies for 10,000 files, written and read back once). An
``expand`` row names the run and round instead; the relay builds the jobs from the files
table a page at a time and remembers how far it got (``after_idx``).

Revision ID: c0002
"""
from alembic import op

revision = "c0002"
down_revision = "c0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE coordinator.outbox ADD COLUMN expand jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE coordinator.outbox DROP COLUMN expand")
