"""gateway: tenants, hashed API keys, HTTP idempotency records

Revision ID: g0001
"""
from alembic import op

from shared.migrations import execute_script

revision = "g0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    CREATE TABLE gateway.tenants (
        id text PRIMARY KEY,
        name text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE gateway.api_keys (
        id text PRIMARY KEY,
        tenant_id text NOT NULL REFERENCES gateway.tenants (id),
        user_name text NOT NULL,
        role text NOT NULL CHECK (role IN ('platform_admin', 'tenant_admin', 'member')),
        key_hash text NOT NULL UNIQUE,
        created_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz
    );
    CREATE TABLE gateway.idempotency (
        tenant_id text NOT NULL,
        key text NOT NULL,
        request_hash text NOT NULL,
        state text NOT NULL CHECK (state IN ('in_progress', 'done')),
        status integer,
        body bytea,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (tenant_id, key)
    )
    """)


def downgrade() -> None:
    for table in ("idempotency", "api_keys", "tenants"):
        op.execute(f"DROP TABLE gateway.{table}")
