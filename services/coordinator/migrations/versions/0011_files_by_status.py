"""coordinator: a run's files that ended without success, found without reading the rest of the run

GET /workflow-runs/{id}?file_status=ERROR on a 100,000-file run read all 100,000 of its rows
through the primary key to keep its 500 (30-35 ms, in a table of 20 million files), and a
page of a cancelled run's 50,000 CANCELLED files read them all (13-20 ms); with this index,
under a millisecond.

Partial, on the files that FAILED, ended in ERROR, were SKIPPED or CANCELLED, so that the
hot path writes nothing to it: a file is created PENDING and mostly ends SUCCEEDED, and
neither enters it (a COPY of a run's files and the results' updates cost what they did).
store.run_body names the statuses as literals: PostgreSQL can prove this predicate from
``status = 'ERROR'``, not from a bound parameter, and a prepared statement's cached generic
plan would otherwise go back to reading the whole run.

Revision ID: c0011
"""
from alembic import op

revision = "c0011"
down_revision = "c0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX files_ended_without_success ON coordinator.files (run_id, status, idx) "
               "WHERE status NOT IN ('SUCCEEDED', 'PENDING')")


def downgrade() -> None:
    op.execute("DROP INDEX coordinator.files_ended_without_success")
