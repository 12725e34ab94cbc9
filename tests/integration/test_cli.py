"""The `redrive` CLI against a real database: tenants, keys, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def redrive(settings, *args):
    env = {**os.environ, "NATS_URL": settings.nats_url, "DATABASE_URL": settings.database_url,
           "REDRIVE_DATA_DIR": str(settings.data_dir)}
    return subprocess.run([sys.executable, "-m", "redrive", *args], env=env, capture_output=True, text=True, timeout=60)


async def test_tenant_and_key_creation_and_usage_errors(make_settings):
    settings = await make_settings()
    made = redrive(settings, "tenant", "create", "acme", "--monthly-credits", "50", "--json")
    assert made.returncode == 0, made.stderr
    tenant = json.loads(made.stdout)["tenant_id"]
    key = redrive(settings, "key", "create", "--tenant", tenant, "--role", "member", "--json")
    assert key.returncode == 0 and json.loads(key.stdout)["key"].startswith("rk_")
    bad_role = redrive(settings, "key", "create", "--tenant", tenant, "--role", "king")
    assert bad_role.returncode == 2 and "Traceback" not in bad_role.stderr
    no_tenant = redrive(settings, "key", "create", "--tenant", "nope", "--role", "member")
    assert no_tenant.returncode == 1 and "no tenant nope" in no_tenant.stderr and "Traceback" not in no_tenant.stderr
    unknown = redrive(settings, "service", "nonsense")
    assert unknown.returncode == 2
    from services.billing.admin import open_account_direct

    balance = await open_account_direct(settings, tenant, 0, 0)  # idempotent: the CLI already opened it
    assert balance["monthly"]["allowance"] == 50
