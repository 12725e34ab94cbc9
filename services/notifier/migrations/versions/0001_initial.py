"""notifier: notifications, webhooks, webhook deliveries (an outbox of HTTP posts)

Revision ID: n0001
"""
from alembic import op

from shared.migrations import execute_script

revision = "n0001"
down_revision = None
branch_labels = None
depends_on = None

S = "notifier"


def upgrade() -> None:
    execute_script(op, f"""
    CREATE TABLE {S}.notifications (
        id text PRIMARY KEY,
        tenant_id text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        kind text NOT NULL,
        run_id text,
        file_index integer,
        message text NOT NULL,
        read boolean NOT NULL DEFAULT false,
        dedupe_key text NOT NULL UNIQUE
    );
    CREATE INDEX notifications_by_tenant ON {S}.notifications (tenant_id, at DESC, id DESC);
    CREATE TABLE {S}.webhooks (
        tenant_id text PRIMARY KEY,
        url text NOT NULL,
        secret text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE {S}.deliveries (
        id bigserial PRIMARY KEY,
        notification_id text NOT NULL,
        tenant_id text NOT NULL,
        url text NOT NULL,
        body bytea NOT NULL,
        attempts integer NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
        last_error text,
        delivered_at timestamptz
    );
    CREATE INDEX deliveries_due ON {S}.deliveries (next_attempt_at) WHERE status = 'pending';
    CREATE INDEX deliveries_pending_by_tenant ON {S}.deliveries (tenant_id) WHERE status = 'pending'
    """)


def downgrade() -> None:
    for table in ("deliveries", "webhooks", "notifications"):
        op.execute(f"DROP TABLE {S}.{table}")
