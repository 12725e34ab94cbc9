"""coordinator: keyed requests already applied (Continue, file retry)

The gateway names each use of an Idempotency-Key; a Continue or file retry carrying such a
name is applied once: a gateway that died after the coordinator had applied it, and a
client retrying, find it here and get the run instead of a second charge.

Revision ID: c0010
"""
from alembic import op

revision = "c0010"
down_revision = "c0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE coordinator.requests_applied ("
               " tenant_id text NOT NULL, request_id text NOT NULL, run_id text NOT NULL, "
               " applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (tenant_id, request_id))")
    op.execute("CREATE INDEX requests_applied_by_age ON coordinator.requests_applied USING brin (applied_at)")


def downgrade() -> None:
    op.execute("DROP TABLE coordinator.requests_applied")
