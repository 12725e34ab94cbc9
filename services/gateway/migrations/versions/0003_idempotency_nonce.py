"""gateway: a nonce per use of an Idempotency-Key, and keys released by a failed attempt

What a keyed request makes is named by tenant, key and ``nonce`` (a run's id, a grant's
ledger key), not by tenant and key alone: the nonce is drawn when the key is first recorded
and lives as long as the record (24 h), so retries find the same run while a key used again
after its window makes a new one. Rows from before this revision have no nonce and keep
naming their effect by the key alone (services/gateway/routes.py), so a request in flight
across the upgrade still finds its run.

``released``: the last attempt under the key got no answer worth storing (a 5xx). The row,
and so its nonce, is kept, so that a retry of the same request reaches what that attempt
may have made; before this revision the row was deleted.

Downgrade deletes released rows (what the older code did on a 5xx) and the nonces: a row
then in progress would be retried under the older, key-only name.

Revision ID: g0003
"""
from alembic import op

from shared.migrations import execute_script

revision = "g0003"
down_revision = "g0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    execute_script(op, """
    ALTER TABLE gateway.idempotency ADD COLUMN nonce text;
    ALTER TABLE gateway.idempotency DROP CONSTRAINT idempotency_state_check;
    ALTER TABLE gateway.idempotency ADD CONSTRAINT idempotency_state_check
        CHECK (state IN ('in_progress', 'released', 'done'))
    """)


def downgrade() -> None:
    execute_script(op, """
    DELETE FROM gateway.idempotency WHERE state = 'released';
    ALTER TABLE gateway.idempotency DROP CONSTRAINT idempotency_state_check;
    ALTER TABLE gateway.idempotency ADD CONSTRAINT idempotency_state_check CHECK (state IN ('in_progress', 'done'));
    ALTER TABLE gateway.idempotency DROP COLUMN nonce
    """)
