"""billing: accounts and the append-only ledger

Revision ID: b0001
"""
from alembic import op

from shared.migrations import execute_script

revision = "b0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    CREATE TABLE billing.accounts (
        tenant_id text PRIMARY KEY,
        monthly_allowance integer NOT NULL CHECK (monthly_allowance >= 0),
        monthly_remaining integer NOT NULL CHECK (monthly_remaining >= 0),
        period_start timestamptz NOT NULL,
        period_end timestamptz NOT NULL,
        purchased_remaining integer NOT NULL CHECK (purchased_remaining >= 0),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    -- Signed amounts: charge < 0, refund/grant/reset > 0, void = 0. For every tenant,
    -- sum(amount) = monthly_remaining + purchased_remaining.
    CREATE TABLE billing.ledger (
        id bigserial PRIMARY KEY,
        tenant_id text NOT NULL REFERENCES billing.accounts (tenant_id),
        at timestamptz NOT NULL DEFAULT now(),
        kind text NOT NULL CHECK (kind IN ('charge', 'refund', 'grant', 'reset', 'void')),
        amount integer NOT NULL,
        monthly_part integer NOT NULL DEFAULT 0,
        purchased_part integer NOT NULL DEFAULT 0,
        run_id text,
        idempotency_key text NOT NULL,
        refund_of text,
        actor text,
        -- Keys are the caller's: unique per tenant, so one tenant's keys never collide
        -- with (or reveal) another's.
        UNIQUE (tenant_id, idempotency_key)
    );
    CREATE INDEX ledger_by_tenant ON billing.ledger (tenant_id, id DESC);
    CREATE INDEX ledger_refunds ON billing.ledger (refund_of) WHERE refund_of IS NOT NULL
    """)


def downgrade() -> None:
    op.execute("DROP TABLE billing.ledger")
    op.execute("DROP TABLE billing.accounts")
