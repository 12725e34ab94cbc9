"""coordinator: credits as bigint

A run of 3,000 files at 1,000,000 credits each costs 3e9 credits, past PostgreSQL's
integer: the request failed on the credit intent with a vague 400 instead of the 402 the
contract gives. Counts of files stay integers; amounts of credits are bigint everywhere.
(The tables are rewritten once, under a lock: a young install's tables are small.)

Revision ID: c0006
"""
from alembic import op

revision = "c0006"
down_revision = "c0005"
branch_labels = None
depends_on = None

_COLUMNS = {
    "runs": ("credits_consumed", "credits_from_monthly", "credits_from_purchased", "credits_refunded"),
    "credit_intents": ("amount",),
    "refunds_due": ("amount",),
}


def upgrade() -> None:
    for table, columns in _COLUMNS.items():
        op.execute(f"ALTER TABLE coordinator.{table} " + ", ".join(f"ALTER COLUMN {c} TYPE bigint" for c in columns))


def downgrade() -> None:
    for table, columns in _COLUMNS.items():
        op.execute(f"ALTER TABLE coordinator.{table} " + ", ".join(f"ALTER COLUMN {c} TYPE integer" for c in columns))
