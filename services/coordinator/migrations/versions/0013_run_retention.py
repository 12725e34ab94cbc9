"""coordinator: finished runs found by age, and their credit rows by run, for run retention

services/coordinator/run_retention.py deletes a finished run ``run_retention_days`` after
it finished, with everything of it this schema keeps. It finds them oldest first through
``runs_finished`` (only finished runs have a ``finished_at``: every command that resumes
a run clears it), and deletes their credit intents and refunds through the two run_id
indexes; both tables get one row per charge or refund, not per file, so the hot path
does not notice them.

Revision ID: c0013
"""
from alembic import op

from shared.migrations import execute_script

revision = "c0013"
down_revision = "c0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    CREATE INDEX runs_finished ON coordinator.runs (finished_at, id) WHERE finished_at IS NOT NULL;
    CREATE INDEX credit_intents_by_run ON coordinator.credit_intents (run_id);
    CREATE INDEX refunds_due_by_run ON coordinator.refunds_due (run_id);
    """)


def downgrade() -> None:
    execute_script(op, """
    DROP INDEX coordinator.refunds_due_by_run;
    DROP INDEX coordinator.credit_intents_by_run;
    DROP INDEX coordinator.runs_finished;
    """)
