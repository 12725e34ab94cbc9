"""coordinator: until when a run may be quiet without being stuck

Set from executors' heartbeats for jobs in flight (a step longer than the lease is alive,
not stuck) and from announced waits (a retry's backoff, a breaker's probe time). The
recovery sweep takes a run as stuck only past both its last progress and this, plus the
lease.

Revision ID: c0005
"""
from alembic import op

revision = "c0005"
down_revision = "c0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs ADD COLUMN quiet_until timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs DROP COLUMN quiet_until")
