"""gateway: idempotency records found by age

The hourly purge deletes a batch at a time (each well inside the gateway's statement
timeout, however far behind it is), finding old rows through a BRIN index on
``created_at``: rows arrive in that order, so the index is a few pages.

Revision ID: g0004
"""
from alembic import op

revision = "g0004"
down_revision = "g0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX idempotency_created_at ON gateway.idempotency USING brin (created_at) "
               "WITH (autosummarize = on)")


def downgrade() -> None:
    op.execute("DROP INDEX gateway.idempotency_created_at")
