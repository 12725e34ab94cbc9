"""coordinator: runs whose users were told a recovery started without a re-publish

The recovery sweep finds a quiet run whose jobs are out with an executor that says nothing
(one that died: JetStream brings them back after the ack wait). It re-publishes nothing,
but tells the run's users "Recovery started", and fan-in owes them "Recovery succeeded".
That is ``recovery_noticed``, kept apart from ``recovering`` (re-published by a recovery),
whose count of fruitless re-publishes decides when the sweep gives up.

Revision ID: c0014
"""
from alembic import op

revision = "c0014"
down_revision = "c0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs ADD COLUMN recovery_noticed boolean NOT NULL DEFAULT false")


def downgrade() -> None:
    op.execute("ALTER TABLE coordinator.runs DROP COLUMN recovery_noticed")
