"""coordinator: whether a run's users were told "Recovery started" for its current stall

Set when a recovery starts (the sweep's, an operator's, or the waiting path's notice);
cleared by progress, fan-in, a cancel. The sweep's next attempt at the same stall, and
jobs first awaited then found lost, tell nobody again; a stall after progress is a new one
and is told. (``recovering`` and ``recovery_noticed`` last until fan-in: they decide the
"Recovery succeeded" notice and the give-up count, not this.)

Revision ID: c0016
"""
from alembic import op

revision = "c0016"
down_revision = "c0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs ADD COLUMN recovery_told boolean NOT NULL DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs DROP COLUMN recovery_told")
