"""The operator's CLI commands against a running system (its HTTP API): settings, submit,
Continue, restore, cancel and recover do what the buttons do, and say why when refused."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys

import pytest

from shared.db import make_engine
from services.gateway.identity import create_key, create_tenant
from tests.stack import Stack, counts_add_up


@pytest.fixture(scope="module")
async def system(make_settings):
    settings = await make_settings(port=0)
    stack = await Stack(settings).start("billing", "coordinator", "executor", "notifier", "gateway")
    engine = make_engine(settings, pool_size=1)
    try:
        tenant = await create_tenant(engine, "cli")
        await stack.call("billing", "open_account", tenant_id=tenant, monthly_allowance=100)
        admin = await create_key(engine, tenant, "platform_admin", "ops")
        tenant_admin = await create_key(engine, tenant, "tenant_admin", "lead")
        member = await create_key(engine, tenant, "member", "dev")
    finally:
        await engine.dispose()
    yield {"stack": stack, "tenant": tenant, "settings": settings, "admin": admin, "tenant_admin": tenant_admin,
           "member": member,
           "url": f"http://127.0.0.1:{stack.services['gateway'][0].port}"}
    await stack.stop()


async def redrive(system, *args: str, key: str | None = None, env: dict | None = None) -> tuple[int, str, str]:
    """The CLI in its own process; awaited, since the services run on this test's loop."""
    extra, env = env or {}, {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "DATABASE_URL", "REDRIVE_TENANT")}
    env.update(REDRIVE_API_URL=system["url"], REDRIVE_API_KEY=key or system["admin"],
               REDRIVE_DATA_DIR=str(system["settings"].data_dir / "cli"), **extra)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "redrive", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


async def ok(system, *args: str, key: str | None = None, env: dict | None = None):
    code, out, err = await redrive(system, *args, "--json", key=key, env=env)
    assert code == 0, (args, err)
    return json.loads(out)


async def test_settings_submit_continue_and_restore_through_the_cli(system):
    stack, tenant = system["stack"], system["tenant"]
    settings = await ok(system, "settings", "--auto-retries", "0", "--backoff-base-ms", "10", "--backoff-max-ms", "10",
                        "--no-jitter", key=system["tenant_admin"])
    assert settings["auto_retries"] == 0 and settings["jitter"] is False
    assert (await stack.call("coordinator", "get_settings", tenant_id=tenant))["auto_retries"] == 0
    # Fails every attempt of round 0: with no automatic retries, FAILED until Continue.
    template = await stack.template(tenant, [{"name": "s", "handler": "flaky", "params": {"fail_rounds": 1}}])
    run = await ok(system, "run", "submit", "--template", template, "--file", "a.pdf", "--file", "b.pdf",
                   key=system["member"])
    failed = await stack.wait_run(tenant, run["id"])
    assert failed["status"] == "COMPLETED_WITH_ERRORS" and failed["counts"]["failed"] == 2

    # Members read and start runs; Continue is an admin's (product.md, Roles).
    code, _, err = await redrive(system, "run", "retry-failed", run["id"], key=system["member"])
    assert code == 1 and "tenant_admin" in err and "Traceback" not in err
    continued = await ok(system, "run", "retry-failed", run["id"], key=system["tenant_admin"])
    assert continued["status"] == "RUNNING"
    done = await stack.wait_run(tenant, run["id"])
    assert done["status"] == "COMPLETED" and done["credits"]["consumed"] == 4 and counts_add_up(done)

    # Support rewinds file 0 to the start: free, and it runs again.
    restored = await ok(system, "run", "restore", run["id"], "--checkpoint-step", "-1", "--file-index", "0")
    assert restored["status"] == "RUNNING"
    again = await stack.wait_run(tenant, run["id"])
    assert again["status"] == "COMPLETED" and again["credits"]["consumed"] == 4 and counts_add_up(again)
    timeline = await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"])
    assert [e["kind"] for e in timeline["items"]].count("restored") == 1

    # Restore is support's (a platform admin's): refused with the reason, no stack trace.
    code, _, err = await redrive(system, "run", "restore", run["id"], "--checkpoint-step", "-1",
                                 key=system["tenant_admin"])
    assert code == 1 and "platform_admin" in err and "Traceback" not in err
    await stack.assert_books_balance(tenant)


async def test_cancel_and_recover_through_the_cli(system):
    stack, tenant = system["stack"], system["tenant"]
    slow = await stack.template(tenant, [{"name": "s", "handler": "flaky", "params": {"sleep_ms": 3000}}])
    run = await ok(system, "run", "submit", "--template", slow, *[f"--file=f{i}" for i in range(50)])
    cancelled = await ok(system, "run", "cancel", run["id"], key=system["tenant_admin"])
    assert cancelled["status"] == "CANCELLED"
    shown = await stack.wait_run(tenant, run["id"], until=lambda r: r["counts"]["pending"] == 0)
    assert shown["credits"]["refunded"] > 0 and counts_add_up(shown)
    await stack.assert_books_balance(tenant)

    # Nothing to recover in a finished run: the coordinator's reason, as a one-line error.
    code, out, err = await redrive(system, "run", "recover", run["id"])
    assert code == 1 and out == "" and "nothing to recover" in err and "Traceback" not in err


def one_error_line(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 1 and out == "" and "Traceback" not in err, (code, out, err)
    line = err.strip()
    assert "\n" not in line and line.startswith("error: "), err
    for fragment in fragments:
        assert fragment in line, line
    return line


async def test_a_platform_admin_acts_for_another_tenant_with_tenant(system):
    """The key `redrive up` prints is a platform admin's, of one tenant: with --tenant (or
    REDRIVE_TENANT) it shows, continues and recovers another tenant's runs, and reads its
    credits and settings (X-Tenant-Id); any other key naming another tenant gets the API's 403."""
    stack, own = system["stack"], system["tenant"]
    engine = make_engine(system["settings"], pool_size=1)
    try:
        other = await create_tenant(engine, "other")
        await stack.call("billing", "open_account", tenant_id=other, monthly_allowance=37)
        other_admin = await create_key(engine, other, "tenant_admin", "boss")
        other_member = await create_key(engine, other, "member", "dev")
    finally:
        await engine.dispose()

    # The other tenant's settings, changed by the platform admin: its own, not the admin's tenant's.
    mine = await ok(system, "settings")
    changed = await ok(system, "settings", "--auto-retries", "0", "--no-jitter", "--backoff-base-ms", "10",
                       "--backoff-max-ms", "10", "--tenant", other)
    assert changed["auto_retries"] == 0 and (await stack.call("coordinator", "get_settings", tenant_id=other))["auto_retries"] == 0
    assert await ok(system, "settings") == mine
    # A run of the other tenant, submitted for it by the platform admin; it fails, so it needs attention.
    template = await stack.template(other, [{"name": "s", "handler": "flaky", "params": {"fail_rounds": 1}}])
    run = await ok(system, "run", "submit", "--template", template, "--file", "a.pdf", "--file", "b.pdf", "--tenant", other)
    failed = await stack.wait_run(other, run["id"])
    assert failed["status"] == "COMPLETED_WITH_ERRORS" and failed["counts"]["failed"] == 2

    # `redrive attention` (every tenant's) says whose run it is, and what to pass.
    code, out, err = await redrive(system, "attention")
    assert code == 0, err
    lines = out.splitlines()
    heading = lines.index(f"tenant {other}  (its runs: --tenant {other})")
    assert any(run["id"] in line for line in lines[heading:]) and not any(run["id"] in line for line in lines[:heading])
    listed = await ok(system, "attention", "--tenant", other)  # only that tenant's
    assert [r["id"] for r in listed["items"]] == [run["id"]] and listed["items"][0]["tenant_id"] == other

    # Without --tenant: the admin's own tenant has no such run, and the error says how to name its tenant.
    one_error_line(*await redrive(system, "run", "show", run["id"]), "HTTP 404 not_found", "--tenant ID")
    one_error_line(*await redrive(system, "run", "retry-failed", run["id"]), "HTTP 404")
    shown = await ok(system, "run", "show", run["id"], "--tenant", other)
    assert shown["id"] == run["id"] and shown["status"] == "COMPLETED_WITH_ERRORS"
    code, out, err = await redrive(system, "run", "show", run["id"], "--tenant", other)  # as a person reads it
    assert code == 0 and f"run {run['id']}" in out, err
    assert (await ok(system, "run", "show", run["id"], env={"REDRIVE_TENANT": other}))["id"] == run["id"]
    continued = await ok(system, "run", "retry-failed", run["id"], env={"REDRIVE_TENANT": other})
    assert continued["status"] == "RUNNING"
    code, out, err = await redrive(system, "run", "watch", run["id"], "--tenant", other, "--interval", "0.2", "--json")
    assert code == 0 and json.loads(out)["status"] == "COMPLETED", err
    restored = await ok(system, "run", "restore", run["id"], "--checkpoint-step", "-1", "--file-index", "0",
                        "--tenant", other)
    assert restored["status"] == "RUNNING"
    done = await stack.wait_run(other, run["id"])
    assert done["status"] == "COMPLETED" and done["credits"]["consumed"] == 4 and counts_add_up(done)
    one_error_line(*await redrive(system, "run", "recover", run["id"], "--tenant", other), "nothing to recover")

    # Credits: the other tenant's balance (37 - 4), not the admin's tenant's.
    credits = await ok(system, "credits", "--tenant", other)
    assert credits["monthly"] == {**credits["monthly"], "allowance": 37, "remaining": 33}
    assert await ok(system, "credits", env={"REDRIVE_TENANT": other}) == credits
    assert (await ok(system, "credits"))["monthly"]["allowance"] == 100
    assert await ok(system, "credits", "--tenant", own) == await ok(system, "credits")  # its own: as without
    # The other tenant's own keys see the same, without --tenant (or naming their own tenant).
    assert await ok(system, "credits", key=other_member) == credits
    assert (await ok(system, "run", "show", run["id"], "--tenant", other, key=other_member))["status"] == "COMPLETED"

    # Any key but a platform admin's naming another tenant: the API's 403, one line, exit 1.
    for key, commands in ((other_member, (["credits"], ["run", "show", run["id"]], ["run", "watch", run["id"]])),
                          (other_admin, (["settings"], ["run", "recover", run["id"]], ["attention"]))):
        for args in commands:
            one_error_line(*await redrive(system, *args, "--tenant", own, key=key), "HTTP 403 forbidden",
                           "only a platform admin may act for another tenant", f"acting for tenant {own}, from --tenant")
    one_error_line(*await redrive(system, "credits", key=other_member, env={"REDRIVE_TENANT": own}),
                   "HTTP 403 forbidden", "from REDRIVE_TENANT")
    # A tenant that does not exist, named by the platform admin: not found, saying which.
    one_error_line(*await redrive(system, "credits", "--tenant", "nosuchtenant"), "HTTP 404", "nosuchtenant")
    await stack.assert_books_balance(other)


async def test_the_admin_key_of_up_is_kept_readable_by_its_owner_only(make_settings):
    from redrive.bootstrap_admin import ensure_admin_key

    settings = await make_settings()
    key = await asyncio.to_thread(ensure_admin_key, settings)
    path = settings.data_dir / "admin.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.read_text().strip() == key
    assert await asyncio.to_thread(ensure_admin_key, settings) == key  # found again, not made anew
