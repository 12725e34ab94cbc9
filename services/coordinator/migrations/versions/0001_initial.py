"""coordinator: templates, runs, files, outbox, inbox, timeline, credit intents, settings

Revision ID: c0001
"""
from alembic import op

from shared.migrations import execute_script

revision = "c0001"
down_revision = None
branch_labels = None
depends_on = None

S = "coordinator"


def upgrade() -> None:
    execute_script(op, f"""
    CREATE TABLE {S}.templates (
        id text PRIMARY KEY,
        tenant_id text NOT NULL,
        name text NOT NULL,
        steps jsonb NOT NULL,
        credits_per_file integer NOT NULL CHECK (credits_per_file >= 0),
        failure_policy text NOT NULL CHECK (failure_policy IN ('continue', 'fail_fast')),
        created_at timestamptz NOT NULL DEFAULT now(),
        archived_at timestamptz
    );
    CREATE INDEX templates_by_tenant ON {S}.templates (tenant_id, created_at DESC);

    CREATE TABLE {S}.retry_settings (
        tenant_id text PRIMARY KEY,
        policy jsonb NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE TABLE {S}.runs (
        id text PRIMARY KEY,
        tenant_id text NOT NULL,
        template_id text NOT NULL REFERENCES {S}.templates (id),
        status text NOT NULL,
        mode text NOT NULL,
        failure_policy text NOT NULL DEFAULT 'continue',
        credits_per_file integer NOT NULL DEFAULT 1,
        round integer NOT NULL DEFAULT 0,
        generation integer NOT NULL DEFAULT 0,
        max_retry_count integer NOT NULL DEFAULT 3 CHECK (max_retry_count BETWEEN 1 AND 10),
        total integer NOT NULL,
        pending integer NOT NULL,
        succeeded integer NOT NULL DEFAULT 0,
        failed integer NOT NULL DEFAULT 0,
        errored integer NOT NULL DEFAULT 0,
        skipped integer NOT NULL DEFAULT 0,
        cancelled integer NOT NULL DEFAULT 0,
        credits_consumed integer NOT NULL DEFAULT 0,
        credits_from_monthly integer NOT NULL DEFAULT 0,
        credits_from_purchased integer NOT NULL DEFAULT 0,
        credits_refunded integer NOT NULL DEFAULT 0,
        needs_attention boolean NOT NULL DEFAULT false,
        attention_reason text,
        recovery_failures integer NOT NULL DEFAULT 0,
        recovering boolean NOT NULL DEFAULT false,
        fanin_round integer NOT NULL DEFAULT -1,
        created_by text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        finished_at timestamptz,
        last_progress_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT counts_add_up CHECK (
            pending + succeeded + failed + errored + skipped + cancelled = total
            AND pending >= 0 AND succeeded >= 0 AND failed >= 0 AND errored >= 0
            AND skipped >= 0 AND cancelled >= 0)
    );
    CREATE INDEX runs_by_tenant ON {S}.runs (tenant_id, created_at DESC, id DESC);
    CREATE INDEX runs_running ON {S}.runs (last_progress_at) WHERE status = 'RUNNING';
    CREATE INDEX runs_attention ON {S}.runs (tenant_id) WHERE needs_attention;

    CREATE TABLE {S}.files (
        run_id text NOT NULL REFERENCES {S}.runs (id),
        idx integer NOT NULL,
        name text NOT NULL,
        url text,
        content_b64 text,
        size bigint,
        sha256 text,
        status text NOT NULL,
        round integer NOT NULL DEFAULT 0,
        retry_attempt integer NOT NULL DEFAULT 0,
        attempts integer NOT NULL DEFAULT 0,
        checkpoint_step integer,
        checkpoint_output jsonb,
        step_outputs jsonb NOT NULL DEFAULT '{{}}'::jsonb,
        output jsonb,
        last_error jsonb,
        failed_step integer,
        -- The billing idempotency key that paid for this file's current round (NULL: free),
        -- so that a cancel refunds exactly what was charged and never ran.
        charge_key text,
        updated_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (run_id, idx)
    );

    CREATE TABLE {S}.outbox (
        id bigserial PRIMARY KEY,
        subject text NOT NULL,
        msg_id text NOT NULL,
        payload bytea NOT NULL,
        headers jsonb,
        created_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE TABLE {S}.inbox (
        msg_id text PRIMARY KEY,
        received_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE TABLE {S}.timeline (
        id bigserial PRIMARY KEY,
        run_id text NOT NULL,
        tenant_id text NOT NULL,
        at timestamptz NOT NULL DEFAULT now(),
        kind text NOT NULL,
        actor text NOT NULL,
        file_index integer,
        details jsonb NOT NULL DEFAULT '{{}}'::jsonb
    );
    CREATE INDEX timeline_by_run ON {S}.timeline (run_id, id);

    -- A credit reservation we asked billing for, written and committed *before* asking,
    -- so that a crash between the charge and the run update is found and refunded.
    CREATE TABLE {S}.credit_intents (
        key text PRIMARY KEY,
        run_id text NOT NULL,
        tenant_id text NOT NULL,
        amount integer NOT NULL,
        state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'applied', 'compensated')),
        created_at timestamptz NOT NULL DEFAULT now()
    );
    -- Refunds owed (cancel): written with the change, paid after commit, retried by the sweep.
    CREATE TABLE {S}.refunds_due (
        key text PRIMARY KEY,
        of_key text NOT NULL,
        run_id text NOT NULL,
        tenant_id text NOT NULL,
        amount integer NOT NULL,
        paid boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX credit_intents_pending ON {S}.credit_intents (created_at) WHERE state = 'pending';
    """)


def downgrade() -> None:
    for table in ("refunds_due", "credit_intents", "timeline", "inbox", "outbox", "files", "runs", "retry_settings", "templates"):
        op.execute(f"DROP TABLE IF EXISTS {S}.{table}")
