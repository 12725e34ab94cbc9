"""notifier: a tenant's unread notifications, newest first, without reading the ones it read

The dashboard asks for a tenant's unread notifications (``GET /notifications?unread=true``,
up to 200: its unread count) every time it shows them, and every 30 s while it is open.
``notifications_by_tenant`` made that read every notification the tenant has (90 days of
them) whenever fewer than a page were unread: a tenant that keeps up with its notifications
paid the most (42,500 read notifications: 6-8 ms a look, and in proportion to what it gets).

Partial on ``read IS false``, the very condition the query (services/notifier/repository.py)
writes, so that PostgreSQL matches it in any plan. A notification enters it when it is
recorded and leaves it when it is read.

Revision ID: n0004
"""
from alembic import op

revision = "n0004"
down_revision = "n0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX notifications_unread_by_tenant ON notifier.notifications (tenant_id, at DESC, id DESC) "
               "WHERE read IS false")


def downgrade() -> None:
    op.execute("DROP INDEX notifier.notifications_unread_by_tenant")
