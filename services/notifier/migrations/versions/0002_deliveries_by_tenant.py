"""notifier: a tenant's webhook deliveries, newest first (GET /webhook/deliveries)

Without it, listing one tenant's deliveries walks the whole table's primary key backwards
past every other tenant's.

Revision ID: n0002
"""
from alembic import op

revision = "n0002"
down_revision = "n0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX deliveries_by_tenant ON notifier.deliveries (tenant_id, id DESC)")


def downgrade() -> None:
    op.execute("DROP INDEX notifier.deliveries_by_tenant")
