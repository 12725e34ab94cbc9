"""coordinator: find old inbox rows cheaply, so they can be pruned (services/coordinator/inbox.py)

BRIN, not btree: rows arrive in ``received_at`` order, so a BRIN index is a few pages and
costs the results hot path (one inbox insert per file event) next to nothing.

Revision ID: c0003
"""
from alembic import op

revision = "c0003"
down_revision = "c0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX inbox_received_at ON coordinator.inbox USING brin (received_at) WITH (autosummarize = on)")


def downgrade() -> None:
    op.execute("DROP INDEX coordinator.inbox_received_at")
