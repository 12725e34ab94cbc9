"""coordinator: what a template's steps need of every file

A download step without ``params.url`` needs each file's ``url``. The executor that checks
a new template's params says so, and the template keeps it (step index → file fields), so
that a run whose files lack it is refused when submitted (422), before it is charged,
rather than those files ending ERROR. Templates made before this need nothing.

Revision ID: c0015
"""
from alembic import op

revision = "c0015"
down_revision = "c0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE coordinator.templates ADD COLUMN file_needs jsonb NOT NULL DEFAULT '{}'::jsonb")


def downgrade() -> None:
    op.execute("ALTER TABLE coordinator.templates DROP COLUMN file_needs")
