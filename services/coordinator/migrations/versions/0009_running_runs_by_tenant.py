"""coordinator: a tenant's RUNNING runs, found without reading all of its runs

The outbox relay sums a tenant's pending files over its RUNNING runs before each page of
jobs it publishes (window.room: the tenant's window); ``runs_by_tenant`` would have it
read every run the tenant ever made.

Revision ID: c0009
"""
from alembic import op

revision = "c0009"
down_revision = "c0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX runs_running_by_tenant ON coordinator.runs (tenant_id) INCLUDE (mode, pending) "
               "WHERE status = 'RUNNING'")


def downgrade() -> None:
    op.execute("DROP INDEX coordinator.runs_running_by_tenant")
