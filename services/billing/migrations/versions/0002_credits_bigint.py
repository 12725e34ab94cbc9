"""billing: balances and ledger amounts as bigint

Twenty-two grants of 100,000,000 credits took a balance past PostgreSQL's integer, and a
reservation of 3e9 credits failed before it could be refused as more than the balance
(402): both were vague 400s. (The tables are rewritten once, under a lock.)

Revision ID: b0002
"""
from alembic import op

revision = "b0002"
down_revision = "b0001"
branch_labels = None
depends_on = None

_COLUMNS = {
    "accounts": ("monthly_allowance", "monthly_remaining", "purchased_remaining"),
    "ledger": ("amount", "monthly_part", "purchased_part"),
}


def upgrade() -> None:
    for table, columns in _COLUMNS.items():
        op.execute(f"ALTER TABLE billing.{table} " + ", ".join(f"ALTER COLUMN {c} TYPE bigint" for c in columns))


def downgrade() -> None:
    for table, columns in _COLUMNS.items():
        op.execute(f"ALTER TABLE billing.{table} " + ", ".join(f"ALTER COLUMN {c} TYPE integer" for c in columns))
