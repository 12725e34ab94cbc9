"""coordinator: the trace a run belongs to (W3C trace id; shared/tracing.py)

The trace of the request that created the run; NULL for runs made before this column
existed or without a trace, whose trace id is then derived from the run id.

Revision ID: c0004
"""
from alembic import op

revision = "c0004"
down_revision = "c0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs ADD COLUMN trace_id text")


def downgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs DROP COLUMN trace_id")
