"""A hung billing (SIGSTOP: it takes requests and never answers) must not hold up the
recovery of stuck runs: the sweep settled the credits it owed first, each refund waiting out
its call's timeout, and only then looked for stuck runs."""

from __future__ import annotations

import os
import signal

import pytest

from tests.procs import ProcStack

pytestmark = pytest.mark.chaos

OWED = 8  # refunds owed while billing hangs: 8 × the 3 s timeout = 24 s a settlement pass


async def test_a_stuck_run_is_recovered_while_a_hung_billing_owes_refunds(chaos_settings):
    settings = await chaos_settings(recovery_lease_s=1.0, request_timeout_s=3)
    stack = await ProcStack(settings).start("billing", "coordinator")  # no executor: jobs wait in the stream
    billing = stack.procs["billing"][0]
    try:
        tenant = await stack.tenant(monthly=100)
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        stuck = (await stack.submit(tenant, template, 2))["id"]
        to_cancel = [(await stack.submit(tenant, template, 1))["id"] for _ in range(OWED)]
        os.kill(billing.pid, signal.SIGSTOP)
        try:
            for run_id in to_cancel:  # each refund is left owed, for the sweep
                await stack.call("coordinator", "cancel", tenant_id=tenant, actor="t", run_id=run_id)
            await stack.js.purge_stream(stack.names.jobs_stream)  # the stuck run's jobs are lost
            run = await stack.wait_run(tenant, stuck, until=lambda r: r["attention_reason"] == "stuck", timeout=12)
            assert run["status"] == "RUNNING" and run["needs_attention"]
        finally:
            os.kill(billing.pid, signal.SIGCONT)
        for run_id in to_cancel:  # and the refunds are paid once billing answers again
            await stack.wait_run(tenant, run_id, until=lambda r: r["credits"]["refunded"] == 1, timeout=60)
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()
