"""Recovery: fail_fast and recover, the automatic sweep and its give-up, restore from a
checkpoint, and the operators' attention list."""

from __future__ import annotations

import asyncio
import contextlib
import json

from shared import streams
from shared.messages import FileEvent, ServiceError, job_id_for
from tests.stack import Stack, counts_add_up, expect_error


async def notes(stack, tenant, run_id, kind, n=1, timeout=20):
    for _ in range(int(timeout / 0.05)):
        found = [i for i in (await stack.call("notifier", "list", tenant_id=tenant, limit=200))["items"]
                 if i["run_id"] == run_id and i["kind"] == kind]
        if len(found) >= n:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {kind} notification")


async def test_fail_fast_stops_the_run_and_recover_resumes_the_rest(make_settings):
    stack = await Stack(await make_settings(executor_concurrency=1)).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(
            # Slow files: the stop reaches the executor (outbox → KV) while at most one more
            # runs, even on a loaded machine (at 200 ms a file, a third one sometimes ran).
            tenant, [{"name": "a", "handler": "flaky", "params": {"poison": "^bad", "sleep_ms": 600}}],
            failure_policy="fail_fast")
        files = [{"name": "bad.pdf"}] + [{"name": f"ok{i}.pdf"} for i in range(6)]
        run = await stack.submit(tenant, template, 0, files=files)
        failed = await stack.wait_run(tenant, run["id"], until=lambda r: r["status"] == "FAILED")
        await asyncio.sleep(1.0)  # jobs still queued must not run now
        failed = await stack.run(tenant, run["id"])
        assert failed["status"] == "FAILED" and failed["needs_attention"] and failed["files"][0]["status"] == "ERROR"
        assert failed["counts"]["pending"] >= 4 and counts_add_up(failed)
        attention = await stack.call("coordinator", "attention", tenant_id=tenant)
        assert [(r["id"], r["reason"]) for r in attention["items"]] == [(run["id"], "failed")]
        resumed = await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"])
        assert resumed["status"] == "RUNNING"
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED_WITH_ERRORS" and done["counts"]["succeeded"] == 6
        await notes(stack, tenant, run["id"], "run_recovery_started")
        await notes(stack, tenant, run["id"], "run_recovered")
        await expect_error("run_not_recoverable", stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"]))
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


@contextlib.asynccontextmanager
async def jobs_lost(stack):
    """The broker loses every job it is given (a disk lost with unsynced writes, again and
    again): what the recovery sweep exists for."""
    async def purge_forever():
        while True:
            await stack.js.purge_stream(stack.names.jobs_stream)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(purge_forever())
    try:
        yield
    finally:
        task.cancel()


async def given_up(make_settings) -> tuple[Stack, str, dict]:
    """A stack with no executor (nothing progresses) whose broker lost a 3-file run's jobs
    until the sweep gave the run up; (stack, tenant, the FAILED run)."""
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=0.5, recovery_max_failures=2)
    stack = await Stack(settings).start("billing", "coordinator", "notifier")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        async with jobs_lost(stack):
            run = await stack.submit(tenant, template, 3)
            return stack, tenant, await stack.wait_run(tenant, run["id"], timeout=30)
    except BaseException:
        await stack.stop()
        raise


async def test_the_sweep_recovers_runs_whose_jobs_are_lost_then_gives_up_and_flags_them(make_settings):
    stack, tenant, failed = await given_up(make_settings)
    run = failed
    try:
        assert failed["status"] == "FAILED" and failed["needs_attention"]
        assert failed["attention_reason"] == "recovery_failed" and failed["counts"]["pending"] == 3
        [note] = await notes(stack, tenant, run["id"], "run_recovery_failed")
        assert note["message"] == "Recovery failed: the run made no progress after repeated recoveries"
        kinds = [e["kind"] for e in (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]]
        assert kinds.count("recovery_started") == 2 and kinds.count("recovery_failed") == 1
        # Two attempts, one recovery: its users were told it started once (events reach the
        # notifier in order, so the second attempt's would be stored before the failure's).
        assert len(await notes(stack, tenant, run["id"], "run_recovery_started")) == 1
        # An operator brings an executor back and recovers by hand: free of charge.
        await stack.start("executor")
        await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"])
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED" and done["credits"]["consumed"] == 3 and not done["needs_attention"]
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


async def test_a_run_given_up_whose_files_then_all_finish_is_completed_and_its_users_told(make_settings):
    """The sweep gives a run up when recoveries bring no progress; if its jobs were only
    slow, their results still come. Every file done, the run stayed FAILED with "Recovery
    failed", and no completion was ever told."""
    stack, tenant, failed = await given_up(make_settings)
    run = failed
    try:
        assert (failed["status"], failed["attention_reason"]) == ("FAILED", "recovery_failed")
        for index in range(3):  # as a slow executor would, at last
            event = FileEvent(kind="succeeded", job_id=job_id_for(run["id"], index, failed["round"]), run_id=run["id"],
                              tenant_id=tenant, file_index=index, round=failed["round"], attempt=1, step=0, output={})
            await stack.js.publish(stack.names.file_event("succeeded"), event.to_bytes(),
                                   headers={"Nats-Msg-Id": event.msg_id})
        done = await stack.wait_run(tenant, run["id"], until=lambda r: r["status"] != "FAILED")
        assert done["status"] == "COMPLETED" and not done["needs_attention"] and counts_add_up(done)
        await notes(stack, tenant, run["id"], "run_completed")
        [note] = await notes(stack, tenant, run["id"], "run_recovered")
        assert note["message"].startswith("Recovery succeeded")
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


async def test_a_stall_after_progress_is_told_anew_and_each_stall_once(make_settings):
    """Users hear "Recovery started" once per stall: not for the sweep's later attempts at
    it, but again for a new stall after the run moved."""
    from shared.messages import FileEvent, job_id_for

    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=0.5, recovery_max_failures=1000)
    stack = await Stack(settings).start("billing", "coordinator", "notifier")  # no executor: nothing moves by itself
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        sweeper = stack.services["coordinator"][0].sweeper

        async def attempts() -> int:
            items = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
            return sum(e["kind"] == "recovery_started" for e in items)

        async def until_attempts(n: int) -> None:
            while await attempts() < n:
                await asyncio.sleep(0.05)

        async with jobs_lost(stack):
            run = await stack.submit(tenant, template, 3)
            await until_attempts(2)  # the first stall, recovered twice
            # The run moves (a file's result), then stalls again.
            done = FileEvent(kind="succeeded", job_id=job_id_for(run["id"], 0, 0), run_id=run["id"], tenant_id=tenant,
                             file_index=0, round=0, attempt=1, step=0, output={})
            await stack.js.publish(stack.names.file_event("succeeded"), done.to_bytes(), headers={"Nats-Msg-Id": done.msg_id})
            await stack.wait_run(tenant, run["id"], until=lambda r: r["counts"]["succeeded"] == 1)
            seen = await attempts()
            await until_attempts(seen + 2)  # the second stall, recovered twice
            passes = sweeper.passes
            while sweeper.passes < passes + 2:
                await asyncio.sleep(0.05)
        told = await notes(stack, tenant, run["id"], "run_recovery_started", n=2)
        assert len(told) == 2, told
    finally:
        await stack.stop()


async def test_an_operators_recover_of_a_stall_the_sweep_told_of_tells_nobody_again(make_settings):
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=0.5, recovery_max_failures=1000)
    stack = await Stack(settings).start("billing", "coordinator", "notifier")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])

        async def started() -> list[str]:
            items = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
            return [e["actor"] for e in items if e["kind"] == "recovery_started"]

        async with jobs_lost(stack):
            run = await stack.submit(tenant, template, 2)
            while not await started():
                await asyncio.sleep(0.05)
            # Recoverable by hand once quiet for a lease again (the sweep's re-publish was progress).
            while "user:ops" not in await started():
                try:
                    await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"], actor="user:ops")
                except ServiceError as exc:
                    assert "making progress" in str(exc), exc
                    await asyncio.sleep(0.1)
        await stack.start("executor")
        await stack.wait_run(tenant, run["id"])
        await notes(stack, tenant, run["id"], "run_recovered")  # after any notice of the recoveries
        assert len(await notes(stack, tenant, run["id"], "run_recovery_started")) == 1
    finally:
        await stack.stop()


async def test_a_stuck_run_is_listed_for_operators_until_it_progresses(make_settings):
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=0.5, recovery_max_failures=1000)
    stack = await Stack(settings).start("billing", "coordinator")  # no executor yet: nothing progresses
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        async with jobs_lost(stack):
            run = await stack.submit(tenant, template, 2)
            # The sweep re-publishes it; while it tries, the run is shown to operators as stuck.
            stuck = await stack.wait_run(tenant, run["id"], until=lambda r: r["attention_reason"] == "stuck", timeout=30)
        assert stuck["status"] == "RUNNING" and stuck["needs_attention"] and stuck["recovering"]
        listed = await stack.call("coordinator", "attention", tenant_id=tenant)
        assert [(r["id"], r["reason"]) for r in listed["items"]] == [(run["id"], "stuck")]
        await stack.start("executor")  # it comes back: the run moves, and needs nobody
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED" and not done["needs_attention"] and done["attention_reason"] is None
        assert (await stack.call("coordinator", "attention", tenant_id=tenant))["items"] == []
    finally:
        await stack.stop()


async def test_restore_rewinds_a_file_to_an_earlier_checkpoint_without_redoing_earlier_steps(make_settings, tmp_path):
    log = tmp_path / "steps.log"
    stack = await Stack(await make_settings(handlers="tests.chaos.handlers")).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant()
        steps = [{"name": f"s{i}", "handler": "chaos_step", "params": {"log": str(log)}} for i in range(3)]
        template = await stack.template(tenant, steps)
        run = await stack.submit(tenant, template, 2)
        await stack.wait_run(tenant, run["id"])
        await expect_error("run_not_recoverable", stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"]))
        restored = await stack.call("coordinator", "restore", tenant_id=tenant, run_id=run["id"], file_index=0,
                                    checkpoint_step=0)
        assert restored["status"] == "RUNNING" and restored["round"] == 1
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED" and counts_add_up(done) and done["counts"]["succeeded"] == 2
        runs = [json.loads(line) for line in log.read_text().splitlines()]
        file0 = [(r["round"], r["step"]) for r in runs if r["file"] == 0]
        assert file0 == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]  # step 0 was not redone
        await expect_error("bad_request", stack.call("coordinator", "restore", tenant_id=tenant, run_id=run["id"],
                                                     checkpoint_step=5))
    finally:
        await stack.stop()


async def test_a_step_longer_than_the_lease_or_a_long_backoff_is_quiet_not_stuck(make_settings):
    """The sweep must not re-publish a job that is alive (in a long step, or waiting out a
    backoff it announced): a second copy would run it twice, and after a few such
    'recoveries' the run would be given up as FAILED while its file was fine."""
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=1.0, recovery_max_failures=2,
                                   executor_ack_wait_s=0.6)  # in-progress acks and heartbeats every 0.2 s
    stack = await Stack(settings).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant()
        await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=2, backoff_base_ms=3000,
                         backoff_max_ms=3000, jitter=False)
        slow = await stack.template(tenant, [{"name": "slow", "handler": "flaky", "params": {"sleep_ms": 4000}}])
        waits = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_attempts": 1}}])
        runs = [await stack.submit(tenant, slow, 1), await stack.submit(tenant, waits, 1)]
        for run in runs:
            done = await stack.wait_run(tenant, run["id"], timeout=30)
            assert done["status"] == "COMPLETED" and not done["needs_attention"], done
            assert [f["attempts"] for f in done["files"]] == [1 if run is runs[0] else 2]
            kinds = [e["kind"] for e in (await stack.call("coordinator", "timeline", tenant_id=tenant,
                                                          run_id=run["id"]))["items"]]
            assert "recovery_started" not in kinds, kinds
    finally:
        await stack.stop()


async def test_recover_finishes_a_failed_run_with_nothing_pending_so_continue_can_follow(make_settings):
    """A FAILED run whose files all ended (fail_fast tripped on its last file, or files
    finished after recovery gave up) had no way out of FAILED: Recover finishes it."""
    stack = await Stack(await make_settings()).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        await stack.call("coordinator", "put_settings", tenant_id=tenant, auto_retries=0)
        template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"fail_rounds": 1}}],
                                        failure_policy="fail_fast")
        run = await stack.submit(tenant, template, 1)
        failed = await stack.wait_run(tenant, run["id"])
        assert (failed["status"], failed["counts"]["pending"], failed["counts"]["failed"]) == ("FAILED", 0, 1)
        finished = await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"])
        assert finished["status"] == "COMPLETED_WITH_ERRORS" and finished["needs_attention"]
        assert finished["attention_reason"] == "failed" and finished["credits"]["consumed"] == 1
        await notes(stack, tenant, run["id"], "run_recovery_started")  # told, as of every recovery
        await notes(stack, tenant, run["id"], "run_recovered")
        await expect_error("run_not_recoverable", stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"]))
        resumed = await stack.call("coordinator", "retry_failed", tenant_id=tenant, run_id=run["id"])
        assert resumed["round"] == 1
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED" and counts_add_up(done)
        await stack.assert_books_balance(tenant)
    finally:
        await stack.stop()


async def test_runs_waiting_in_the_queue_are_left_alone_and_do_not_crowd_out_a_lost_run(make_settings):
    """No executor: one tenant's 55 runs wait in the jobs stream (alive, not stuck), while
    another tenant's only job is lost by the broker. Only the lost one is re-published,
    though the waiting runs are older and more than one pass takes."""
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=0.5, recovery_max_failures=1000)
    stack = await Stack(settings).start("billing", "coordinator")
    try:
        busy, unlucky = await stack.tenant(), await stack.tenant()
        busy_template = await stack.template(busy, [{"name": "a", "handler": "noop"}])
        waiting = [await stack.submit(busy, busy_template, 1) for _ in range(55)]
        lost_template = await stack.template(unlucky, [{"name": "a", "handler": "noop"}])
        lost = await stack.submit(unlucky, lost_template, 1)

        async def published(tenant):
            info = await stack.js.stream_info(stack.names.jobs_stream, subjects_filter=stack.names.job(tenant))
            return (info.state.subjects or {}).get(stack.names.job(tenant), 0)

        for _ in range(200):  # the outbox relay publishes after the commit
            if await published(unlucky):
                break
            await asyncio.sleep(0.05)
        await stack.js.purge_stream(stack.names.jobs_stream, subject=stack.names.job(unlucky))
        recovered = await stack.wait_run(unlucky, lost["id"], until=lambda r: r["recovering"], timeout=30)
        assert recovered["attention_reason"] == "stuck"
        for run in waiting[:5] + waiting[-5:]:
            now = await stack.run(busy, run["id"])
            assert (now["recovering"], now["needs_attention"]) == (False, False)  # queued: neither re-published nor flagged
        assert await published(busy) == 55  # no second copies
    finally:
        await stack.stop()


async def test_recovering_a_per_file_run_counts_its_pending_files_without_loading_them(make_settings, monkeypatch):
    """Recovery gives a per_file run's PENDING files their jobs through one expansion row,
    which builds them from the table a page at a time: the files are counted, never all
    loaded into the coordinator (100,000 rows, in the sweep's transaction)."""
    from services.coordinator import store

    stack = await Stack(await make_settings(executor_concurrency=1)).start("billing", "coordinator", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(
            tenant, [{"name": "a", "handler": "flaky", "params": {"poison": "^bad", "sleep_ms": 300}}],
            failure_policy="fail_fast")
        run = await stack.submit(tenant, template, 0, files=[{"name": "bad.pdf"}] + [{"name": f"ok{i}.pdf"} for i in range(5)])
        failed = await stack.wait_run(tenant, run["id"], until=lambda r: r["status"] == "FAILED")
        pending = failed["counts"]["pending"]
        assert pending > 0

        async def not_for_per_file(*args, **kwargs):
            raise AssertionError("a per_file run's files were loaded to recover it")

        monkeypatch.setattr(store, "load_files", not_for_per_file)
        await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"])
        done = await stack.wait_run(tenant, run["id"], timeout=30)
        assert done["status"] == "COMPLETED_WITH_ERRORS" and done["counts"]["succeeded"] == 5 and counts_add_up(done)
        timeline = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
        assert [e["details"]["pending_files"] for e in timeline if e["kind"] == "recovery_started"] == [pending]
    finally:
        await stack.stop()


async def test_a_run_whose_job_is_out_with_a_silent_executor_is_flagged_and_told_once_not_republished(make_settings):
    """An executor took the job and says nothing (no result, no heartbeat, its ack wait not
    yet over: it died, say, with the rest of the system). Re-publishing would run a second
    copy, so the sweep only lists the run for operators and tells its users that recovery
    started, once; the job comes back from the broker and the recovery succeeds."""
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=0.5, recovery_max_failures=1)
    stack = await Stack(settings).start("billing", "coordinator", "notifier")  # the silent executor is this test
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        run = await stack.submit(tenant, template, 1)
        await streams.ensure_consumer(stack.js, stack.names.jobs_stream, stack.names.executor_consumer, stack.names.jobs_all,
                                  ack_wait_s=settings.executor_ack_wait_s, max_deliver=settings.executor_max_deliver,
                                  backoff_s=settings.executor_redelivery_backoff_s)  # as an executor would
        taken = await stack.js.pull_subscribe_bind(stack.names.executor_consumer, stack.names.jobs_stream)
        [job] = await taken.fetch(1, timeout=10)
        flagged = await stack.wait_run(tenant, run["id"], until=lambda r: r["needs_attention"], timeout=30)
        assert (flagged["attention_reason"], flagged["recovering"], flagged["round"]) == ("stuck", True, 0)
        sweeper = stack.services["coordinator"][0].sweeper
        passes = sweeper.passes
        while sweeper.passes < passes + 3:  # passes go on: still one job in the stream, still one entry
            await asyncio.sleep(0.05)
        info = await stack.js.stream_info(stack.names.jobs_stream)
        assert info.state.messages == 1
        entries = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
        started = [e for e in entries if e["kind"] == "recovery_started"]
        assert [(e["actor"], e["details"]["pending_files"]) for e in started] == [("system:recovery", 1)]
        [note] = await notes(stack, tenant, run["id"], "run_recovery_started")
        assert note["message"] == "Recovery started (no progress; its jobs come back from the executor that held them)"
        # Then the job is lost after all (a broker store lost with it): the sweep re-publishes
        # it, and that first re-publish is not counted as a failed one (max failures 1 here).
        await taken.unsubscribe()
        await stack.js.purge_stream(stack.names.jobs_stream)
        await stack.start("executor")
        done = await stack.wait_run(tenant, run["id"])
        assert done["status"] == "COMPLETED" and not done["needs_attention"] and not done["recovering"]
        assert counts_add_up(done)
        await notes(stack, tenant, run["id"], "run_recovered")
        kinds = [e["kind"] for e in (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]]
        assert kinds.count("recovery_started") == 2 and "recovery_failed" not in kinds
        # Awaited, then re-published: one recovery, told once.
        assert len(await notes(stack, tenant, run["id"], "run_recovery_started")) == 1
    finally:
        await stack.stop()


async def test_a_recovered_run_that_fails_fast_again_tells_its_users_both_failures(make_settings):
    """Run events that can happen twice in one round (a Recover does not start a new one):
    the second fail_fast stop is stored and sent like the first, and the recovery it ends is
    told as failed."""
    stack = await Stack(await make_settings(executor_concurrency=1)).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(
            tenant, [{"name": "a", "handler": "flaky", "params": {"poison": "^bad", "sleep_ms": 300}}],
            failure_policy="fail_fast")
        files = [{"name": "bad1.pdf"}] + [{"name": f"ok{i}.pdf"} for i in range(4)] + [{"name": "bad2.pdf"}]
        run = await stack.submit(tenant, template, 0, files=files)
        await stack.wait_run(tenant, run["id"], until=lambda r: r["status"] == "FAILED")
        await notes(stack, tenant, run["id"], "run_failed")
        await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"])
        again = await stack.wait_run(tenant, run["id"], until=lambda r: r["status"] == "FAILED" and r["counts"]["errored"] == 2)
        assert again["counts"]["errored"] == 2 and counts_add_up(again)
        assert len(await notes(stack, tenant, run["id"], "run_failed", n=2)) == 2
        [note] = await notes(stack, tenant, run["id"], "run_recovery_failed")
        assert note["message"] == "Recovery failed: a file ended in ERROR (a permanent error, not retried) (fail_fast)"
        kinds = [e["kind"] for e in (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]]
        assert kinds.count("run_failed") == 2 and kinds.count("recovery_failed") == 1
    finally:
        await stack.stop()


async def test_an_operators_recover_after_the_sweep_gave_up_gets_the_sweeps_attempts_again(make_settings):
    settings = await make_settings(recovery_interval_s=0.2, recovery_lease_s=0.5, recovery_max_failures=2)
    stack = await Stack(settings).start("billing", "coordinator", "notifier")  # no executor: nothing progresses
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "noop"}])
        async with jobs_lost(stack):
            run = await stack.submit(tenant, template, 2)
            await stack.wait_run(tenant, run["id"], timeout=30)
            await stack.call("coordinator", "recover", tenant_id=tenant, run_id=run["id"], actor="operator")
            await stack.wait_run(tenant, run["id"], timeout=30)
        entries = (await stack.call("coordinator", "timeline", tenant_id=tenant, run_id=run["id"]))["items"]
        by_hand = next(i for i, e in enumerate(entries) if e["kind"] == "recovery_started" and e["actor"] == "operator")
        after = [(e["kind"], e["actor"]) for e in entries[by_hand + 1:]]
        # The sweep tried again (its count started over) before it gave up a second time.
        assert after == [("recovery_started", "system:recovery"), ("recovery_failed", "system:recovery")]
        assert [e["details"]["attempts"] for e in entries if e["kind"] == "recovery_failed"] == [2, 2]
        # Both give-ups reach its users.
        assert len(await notes(stack, tenant, run["id"], "run_recovery_failed", n=2)) == 2
    finally:
        await stack.stop()


async def test_a_run_cancelled_during_its_recovery_tells_its_users_how_the_recovery_ended(make_settings):
    """Told "Recovery started", users heard nothing more when an operator cancelled the run
    meanwhile: the recovery failed, and they are told so."""
    import asyncpg

    stack = await Stack(await make_settings()).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"sleep_ms": 3000}}])
        run = await stack.submit(tenant, template, 2)
        conn = await asyncpg.connect(stack.settings.database_url)
        try:  # a recovery under way, as the sweep leaves it once it told the users
            await conn.execute("UPDATE coordinator.runs SET recovering = true, recovery_told = true WHERE id = $1",
                               run["id"])
        finally:
            await conn.close()
        cancelled = await stack.call("coordinator", "cancel", tenant_id=tenant, run_id=run["id"])
        assert cancelled["status"] == "CANCELLED"
        [note] = await notes(stack, tenant, run["id"], "run_recovery_failed")
        assert note["message"] == "Recovery failed: the run was cancelled during its recovery"
    finally:
        await stack.stop()


async def test_a_run_stopped_by_a_files_error_says_so_not_that_it_was_retried(make_settings):
    stack = await Stack(await make_settings()).start("billing", "coordinator", "notifier", "executor")
    try:
        tenant = await stack.tenant()
        template = await stack.template(tenant, [{"name": "a", "handler": "flaky", "params": {"poison": "^f0"}}],
                                        failure_policy="fail_fast")
        run = await stack.submit(tenant, template, 1)
        assert (await stack.wait_run(tenant, run["id"]))["status"] == "FAILED"
        [note] = await notes(stack, tenant, run["id"], "run_failed")
        assert note["message"].startswith("Run failed: fail_fast: a file ended in ERROR (a permanent error, not retried)")
    finally:
        await stack.stop()
