"""gateway: a notice on every change of an API key, for the gateways' key caches

A gateway caches the keys it has checked; revoking one (``redrive key revoke``, from any
process) must reach every gateway at once, not when its cache entry expires. A trigger,
not the code that revokes: any revoker is covered, manual SQL included, and PostgreSQL
sends a notification only when (and if) its transaction commits. The payload is the
key's hash, which is what the caches are keyed by; an empty payload (TRUNCATE) means
every key. services/gateway/key_revocations.py listens.

Revision ID: g0002
"""
from alembic import op

revision = "g0002"
down_revision = "g0001"
branch_labels = None
depends_on = None

CHANNEL = "redrive_gateway_api_key_changed"  # services/gateway/key_revocations.py listens on it


def upgrade() -> None:
    # One statement each: execute_script's split on ";\n" would cut the function body.
    op.execute(f"""
    CREATE FUNCTION gateway.notify_api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'TRUNCATE' THEN
            PERFORM pg_notify('{CHANNEL}', '');
        ELSE
            PERFORM pg_notify('{CHANNEL}', OLD.key_hash);
        END IF;
        RETURN NULL;
    END $$""")
    # Any update, not only of revoked_at: a cached principal also holds the role, tenant
    # and user, and an eviction costs one lookup.
    op.execute("CREATE TRIGGER api_key_changed AFTER UPDATE OR DELETE ON gateway.api_keys "
               "FOR EACH ROW EXECUTE FUNCTION gateway.notify_api_key_changed()")
    op.execute("CREATE TRIGGER api_keys_truncated AFTER TRUNCATE ON gateway.api_keys "
               "FOR EACH STATEMENT EXECUTE FUNCTION gateway.notify_api_key_changed()")


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_truncated ON gateway.api_keys")
    op.execute("DROP TRIGGER api_key_changed ON gateway.api_keys")
    op.execute("DROP FUNCTION gateway.notify_api_key_changed()")
