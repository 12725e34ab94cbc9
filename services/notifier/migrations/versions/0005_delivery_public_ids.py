"""notifier: deliveries get a public id, and are listed by when they were made

A delivery's ``id`` is a bigserial that every tenant shares: sent as ``X-Redrive-Delivery``
and listed by ``GET /webhook/deliveries`` (whose cursor was that id too), it told a tenant's
receiver how many deliveries the other tenants got between two of its own (1, 57, 1203…).
Tenants now see ``public_id`` instead: a random UUID (``gen_random_uuid()``, PostgreSQL 13+)
drawn at insert, kept for good (a redelivery is the same delivery, the same header). The
bigserial stays, ours alone (the sender's claims, leases and outcomes).

A page of deliveries is ordered by ``(created_at, public_id)``, newest first, and its cursor
is that position (services/notifier/schemas.py): nothing in it counts anything. The index
``deliveries_by_tenant_created`` serves it and replaces ``deliveries_by_tenant`` (n0002):
only that list needed the order by ``id``, and what else looks a tenant's deliveries up
(redeliver-failed) needs only the leading ``tenant_id``, which the new index has too.

The deliveries already kept get their public id here, and as ``created_at`` the time of their
notification (recorded in the same transaction), or failing that their last attempt's.
Both columns are added empty and filled in one UPDATE before their defaults and NOT NULL:
one rewrite of the table, which retention keeps to 30 days of deliveries.

Revision ID: n0005
"""
from alembic import op

from shared.migrations import execute_script

revision = "n0005"
down_revision = "n0004"
branch_labels = None
depends_on = None

S = "notifier"


def upgrade() -> None:
    execute_script(op, f"""
    ALTER TABLE {S}.deliveries ADD COLUMN public_id uuid, ADD COLUMN created_at timestamptz;
    UPDATE {S}.deliveries d SET public_id = gen_random_uuid(),
        created_at = coalesce((SELECT n.at FROM {S}.notifications n WHERE n.id = d.notification_id),
                              least(d.next_attempt_at, now()));
    ALTER TABLE {S}.deliveries
        ALTER COLUMN public_id SET DEFAULT gen_random_uuid(), ALTER COLUMN public_id SET NOT NULL,
        ALTER COLUMN created_at SET DEFAULT now(), ALTER COLUMN created_at SET NOT NULL;
    CREATE UNIQUE INDEX deliveries_public_id ON {S}.deliveries (public_id);
    CREATE INDEX deliveries_by_tenant_created ON {S}.deliveries (tenant_id, created_at DESC, public_id DESC);
    DROP INDEX {S}.deliveries_by_tenant
    """)


def downgrade() -> None:
    execute_script(op, f"""
    CREATE INDEX deliveries_by_tenant ON {S}.deliveries (tenant_id, id DESC);
    DROP INDEX {S}.deliveries_by_tenant_created;
    DROP INDEX {S}.deliveries_public_id;
    ALTER TABLE {S}.deliveries DROP COLUMN created_at, DROP COLUMN public_id
    """)
