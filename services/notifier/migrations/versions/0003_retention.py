"""notifier: find old notifications and ended deliveries cheaply, so they can be pruned
(services/notifier/retention.py)

BRIN, not btree: notifications arrive in ``at`` order and deliveries end roughly in id
order, so each index is a few pages and costs the inserts next to nothing.

Revision ID: n0003
"""
from alembic import op

revision = "n0003"
down_revision = "n0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX notifications_at ON notifier.notifications USING brin (at) WITH (autosummarize = on)")
    op.execute("CREATE INDEX deliveries_ended_at ON notifier.deliveries "
               "USING brin ((coalesce(delivered_at, next_attempt_at))) WITH (autosummarize = on)")


def downgrade() -> None:
    op.execute("DROP INDEX notifier.deliveries_ended_at")
    op.execute("DROP INDEX notifier.notifications_at")
