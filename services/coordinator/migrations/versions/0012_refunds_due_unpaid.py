"""coordinator: owed refunds found without reading the paid ones, and paid ones pruned

The recovery sweep pays what is owed every pass (commands/cancel.pay_refunds_due:
``WHERE NOT paid ORDER BY created_at LIMIT 200``) and read every refund ever owed to find
it, in a table that only grew. The partial index holds only the unpaid ones (a refund is
mostly paid within the request that owed it, so it leaves the index at once); its
predicate is the query's own literal ``NOT paid``, which PostgreSQL can match in a
generic plan too.

Paid refunds are pruned 30 days after they were paid (``paid_at``, new here; those paid
before it have none, and go by when they were owed), found through a BRIN index on
``created_at``, as the inbox's rows are: rows arrive in that order.

Revision ID: c0012
"""
from alembic import op

from shared.migrations import execute_script

revision = "c0012"
down_revision = "c0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    ALTER TABLE coordinator.refunds_due ADD COLUMN paid_at timestamptz;
    CREATE INDEX refunds_due_unpaid ON coordinator.refunds_due (created_at) WHERE NOT paid;
    CREATE INDEX refunds_due_created_at ON coordinator.refunds_due USING brin (created_at) WITH (autosummarize = on);
    """)


def downgrade() -> None:
    execute_script(op, """
    DROP INDEX coordinator.refunds_due_created_at;
    DROP INDEX coordinator.refunds_due_unpaid;
    ALTER TABLE coordinator.refunds_due DROP COLUMN paid_at;
    """)
