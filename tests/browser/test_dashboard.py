"""The operator dashboard (services/gateway/static/dashboard.html) in a real Chromium against
a real redrive: what it lists and shows matches the API, its buttons act through the API,
and it offers no action the API would refuse. Every test also fails on an uncaught script
error or an unexpected console error (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import urlsplit

import pytest
from playwright.async_api import expect

from tests.browser.conftest import FAST, WAIT_MS

pytestmark = pytest.mark.browser

COUNT_KEYS = ("total", "succeeded", "failed", "errored", "pending", "skipped", "cancelled")


def counts_line(counts: dict) -> str:
    """The run detail's counts line, as the API's counts say it should read."""
    return " · ".join(f"{k} {counts[k]}" for k in COUNT_KEYS)


def meta(ui, label: str):
    """The value shown for one of the run detail's labelled fields."""
    return ui.detail().locator("dl.meta > div").filter(
        has=ui.page.locator("dt", has_text=re.compile(f"^{re.escape(label)}$"))).locator("dd")


def cell(row, column: int):
    return row.locator(":scope > td").nth(column)


FILE_COLUMNS = {"index": 0, "name": 1, "status": 2, "retry_attempt": 3, "attempts": 4, "last_error": 6}


async def test_a_run_from_the_api_is_listed_live_and_opens_with_its_files(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    template = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"poison": "bad"}}])
    await ui.sign_in(key)
    await expect(page.get_by_test_id("runs-table")).to_contain_text("No runs.")

    submitted = await system.submit(key, template, ["a.txt", "bad.txt", "c.txt"])
    run_id = submitted["id"]
    run = await system.finished(key, run_id)
    c = run["counts"]
    assert run["status"] == "COMPLETED_WITH_ERRORS" and (c["succeeded"], c["errored"]) == (2, 1)  # the setup

    # Listed without a reload (live events), with the API's status and progress.
    row = ui.run_row(run_id)
    await expect(row.locator(".badge")).to_have_text(run["status"], timeout=WAIT_MS)
    await expect(row.locator(".nums").first).to_have_text(f"{c['succeeded'] + c['skipped']}/{c['total']}")
    await expect(row.locator(".nums.all")).to_have_text(
        f"failed {c['failed']} · errored {c['errored']} · pending {c['pending']}")
    await expect(cell(row, 3)).to_have_text(str(run["round"]))

    await ui.open_run(run_id)
    assert page.url.endswith(f"#run={run_id}")
    await expect(row).to_have_class(re.compile(r"\bsel\b"))
    detail = ui.detail()
    await expect(detail.locator("h2 .badge")).to_have_text(run["status"])
    await expect(detail.locator(":scope > div.muted")).to_have_text(counts_line(c))
    await expect(meta(ui, "round")).to_have_text(str(run["round"]))
    await expect(meta(ui, "max_retry_count")).to_have_text(str(run["max_retry_count"]))
    await expect(meta(ui, "credits consumed")).to_have_text(str(run["credits"]["consumed"]))

    rows = page.get_by_test_id("files-table").locator("tbody tr")
    await expect(rows).to_have_count(len(run["files"]))
    for f in run["files"]:
        r = ui.file_row(f["index"])
        for name in ("index", "name", "status", "retry_attempt", "attempts"):
            await expect(cell(r, FILE_COLUMNS[name])).to_have_text(str(f[name]))
        if f["last_error"]:
            await expect(cell(r, FILE_COLUMNS["last_error"])).to_contain_text(f["last_error"]["message"])
        else:
            await expect(cell(r, FILE_COLUMNS["last_error"])).to_have_text("")
    await expect(ui.file_row(1).locator(".badge")).to_have_text("ERROR")  # bad.txt, the poisoned one

    # The timeline of the selected run is there too.
    await expect(page.get_by_test_id("timeline").locator("tbody tr").first).to_be_visible()
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


async def test_only_failed_and_error_files_can_be_shown_and_paged(system, dashboard):
    _, key = await system.tenant(monthly=2000)
    ui, page = dashboard, dashboard.page
    template = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"poison": "bad"}}])
    names = [f"{'bad' if i % 400 == 7 else 'ok'}-{i}.txt" for i in range(1200)]  # bad at 7, 407, 807
    run_id = (await system.submit(key, template, names))["id"]
    run = await system.finished(key, run_id)
    assert run["counts"]["errored"] == 3  # the setup
    await ui.sign_in(key)
    await ui.open_run(run_id)
    rows = page.get_by_test_id("files-table").locator("tbody tr")
    await expect(rows).to_have_count(1000)  # a page of every status
    await expect(page.get_by_test_id("files-page")).to_have_text("files 0–999 of 1200")

    await page.get_by_test_id("problems-only").check()
    await expect(rows).to_have_count(3)
    for i in (7, 407, 807):
        await expect(ui.file_row(i).locator(".badge")).to_have_text("ERROR")
    await expect(page.get_by_test_id("next-files")).to_be_hidden()  # all of them on one page

    await page.get_by_test_id("problems-only").uncheck()
    await expect(rows).to_have_count(1000)
    await page.get_by_test_id("next-files").click()
    await expect(page.get_by_test_id("files-page")).to_have_text("files 1000–1199 of 1200")
    await page.get_by_test_id("previous-files").click()
    await expect(page.get_by_test_id("files-page")).to_have_text("files 0–999 of 1200")


async def test_retry_file_then_continue_completes_the_run_and_charges_each_rerun_once(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    # Every attempt of round 0 fails (1 + auto_retries of them); any later round succeeds.
    # So the automatic retries are exhausted, and whatever an operator re-runs succeeds.
    template = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"fail_rounds": 1}}])
    run_id = (await system.submit(key, template, ["f0", "f1", "f2"], max_retry_count=1))["id"]
    run = await system.finished(key, run_id)
    assert run["status"] == "COMPLETED_WITH_ERRORS" and run["counts"]["failed"] == 3  # the setup

    await ui.sign_in(key)
    await ui.open_run(run_id)
    detail = ui.detail()
    await expect(detail.locator("h2 .badge")).to_have_text("COMPLETED_WITH_ERRORS")
    for i in range(3):
        await expect(cell(ui.file_row(i), FILE_COLUMNS["status"])).to_have_text("FAILED")
        await expect(cell(ui.file_row(i), FILE_COLUMNS["attempts"])).to_have_text(str(1 + FAST["auto_retries"]))
        await expect(page.get_by_test_id(f"retry-file-{i}")).to_be_visible()
    await expect(page.get_by_test_id("continue-button")).to_be_visible()

    # One file first (a round of its own), then Continue for the other two.
    await page.get_by_test_id("retry-file-0").click()
    await expect(page.get_by_test_id("notice")).to_contain_text("Retry file 0: done.")
    await expect(cell(ui.file_row(0), FILE_COLUMNS["status"])).to_have_text("SUCCEEDED", timeout=WAIT_MS)
    await expect(detail.locator("h2 .badge")).to_have_text("COMPLETED_WITH_ERRORS", timeout=WAIT_MS)
    await expect(detail.locator(":scope > div.muted")).to_contain_text("succeeded 1 · failed 2")
    await expect(page.get_by_test_id("retry-file-0")).to_have_count(0)

    await page.get_by_test_id("continue-button").click()
    await expect(page.get_by_test_id("notice")).to_contain_text("Continue: done.")
    await expect(detail.locator("h2 .badge")).to_have_text("COMPLETED", timeout=WAIT_MS)
    await expect(detail.locator(":scope > div.muted")).to_have_text(
        counts_line({**dict.fromkeys(COUNT_KEYS, 0), "total": 3, "succeeded": 3}))
    await expect(meta(ui, "round")).to_have_text("2")
    await expect(page.get_by_test_id("continue-button")).to_have_count(0)
    await expect(ui.run_row(run_id).locator(".badge")).to_have_text("COMPLETED", timeout=WAIT_MS)
    timeline = page.get_by_test_id("timeline")
    await expect(timeline).to_contain_text("file_retry")
    await expect(timeline).to_contain_text("retry_failed")

    # The API agrees, and each press charged its files exactly once: 3 at the start, 1 for
    # the file retry, 2 for Continue (not the file already re-run).
    done = await system.run(key, run_id)
    assert done["status"] == "COMPLETED" and done["round"] == 2 and done["counts"]["succeeded"] == 3
    assert [f["retry_attempt"] for f in done["files"]] == [1, 1, 1]
    assert done["credits"]["consumed"] == 6 and done["credits"]["refunded"] == 0
    mine = [e for e in await system.ledger(key) if e.get("run_id") == run_id]
    assert sorted(e["amount"] for e in mine if e["kind"] == "charge") == [-3, -2, -1]
    assert [e for e in mine if e["kind"] == "refund"] == []
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


async def test_retry_settings_form_refuses_keeps_the_input_and_saves(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    ui.allow_http_error(422, "/api/v1/settings/retry")
    await ui.sign_in(key)
    form = page.get_by_test_id("settings-form")
    field = lambda name: page.get_by_test_id(f"setting-{name}")  # noqa: E731
    for name in ("auto_retries", "backoff_base_ms", "backoff_max_ms", "breaker_failure_threshold", "breaker_reset_s"):
        await expect(field(name)).to_have_value(str(FAST[name]))
    await expect(field("jitter")).to_be_checked()
    banner = page.get_by_test_id("error-banner")

    # Out of the form's own range: the browser refuses before any request; the value stays.
    await field("auto_retries").fill("11")
    await page.get_by_test_id("settings-save").click()
    assert await field("auto_retries").evaluate("e => e.validity.rangeOverflow") is True
    await expect(field("auto_retries")).to_have_value("11")
    await expect(banner).to_be_hidden()
    await field("auto_retries").fill(str(FAST["auto_retries"]))

    # Each value in range, but the API refuses the pair: the error shows, the input stays.
    await field("backoff_base_ms").fill("500")
    await field("backoff_max_ms").fill("100")
    async with page.expect_response(lambda r: r.url.endswith("/api/v1/settings/retry")
                                    and r.request.method == "PUT") as refused:
        await page.get_by_test_id("settings-save").click()
    assert (await refused.value).status == 422
    await expect(banner).to_be_visible()
    await expect(page.locator("#banner-code")).to_contain_text("422")
    await expect(page.locator("#banner-msg")).to_contain_text("Retry settings")
    await expect(page.locator("#banner-details")).to_contain_text("backoff_max_ms")
    await expect(field("backoff_base_ms")).to_have_value("500")
    await expect(field("backoff_max_ms")).to_have_value("100")
    assert await system.call("GET", "/settings/retry", key) == FAST  # nothing saved

    # Mended and saved: the banner goes, the API has exactly what was typed.
    await field("backoff_max_ms").fill("2000")
    await field("auto_retries").fill("4")
    await field("breaker_reset_s").fill("45")
    await field("jitter").uncheck()
    await page.get_by_test_id("settings-save").click()
    await expect(page.get_by_test_id("notice")).to_contain_text("Retry settings saved")
    await expect(banner).to_be_hidden()
    saved = {**FAST, "auto_retries": 4, "backoff_base_ms": 500, "backoff_max_ms": 2000, "jitter": False,
             "breaker_reset_s": 45}
    assert await system.call("GET", "/settings/retry", key) == saved
    await expect(form).to_be_visible()
    await expect(field("backoff_max_ms")).to_have_value("2000")  # the form reloaded shows it
    await expect(field("jitter")).not_to_be_checked()


async def test_no_button_the_api_would_refuse(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    noop = await system.template(key, [{"name": "work", "handler": "noop"}])
    poison = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"poison": "."}}])
    always = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"fail_rounds": 9}}])
    # "a" ends in ERROR at once, "b" runs on until cancelled (a finished run cannot be).
    a_fails = await system.template(key, [{"name": "work", "handler": "flaky",
                                           "params": {"poison": "^a$", "sleep_ms": 5000}}])
    completed = (await system.submit(key, noop, ["a", "b"]))["id"]
    errors_only = (await system.submit(key, poison, ["a", "b"]))["id"]
    maxed = (await system.submit(key, always, ["a", "b"], max_retry_count=1))["id"]
    cancelled = (await system.submit(key, a_fails, ["a", "b"], max_retry_count=3))["id"]
    for run_id in (completed, errors_only, maxed):
        await system.finished(key, run_id)
    # maxed: one Continue (round 1 fails too) uses its one retry; cancelled: cancelled with an ERROR file.
    await system.call("POST", f"/workflow-runs/{maxed}/retry-failed", key)
    assert (await system.finished(key, maxed))["counts"]["failed"] == 2
    deadline = asyncio.get_running_loop().time() + 20
    while (await system.run(key, cancelled))["counts"]["errored"] < 1:
        assert asyncio.get_running_loop().time() < deadline, "file a never ended in ERROR"
        await asyncio.sleep(0.05)
    assert (await system.call("POST", f"/workflow-runs/{cancelled}/cancel", key))["status"] == "CANCELLED"

    # What the API says to each action on them (the dashboard must not offer these).
    refusals = {
        completed: [("retry-failed", 400, "run_completed"), ("recover", 409, "run_not_recoverable"),
                    ("cancel", 409, "conflict")],
        errors_only: [("retry-failed", 400, "nothing_to_retry"), ("recover", 409, "run_not_recoverable"),
                      ("files/0/retry", 400, "file_not_failed")],
        maxed: [("retry-failed", 400, "max_retry_count_exceeded"), ("files/0/retry", 400, "max_retry_count_exceeded"),
                ("recover", 409, "run_not_recoverable")],
        cancelled: [("retry-failed", 409, "conflict"), ("files/0/retry", 409, "conflict"), ("cancel", 409, "conflict")],
    }
    for run_id, asks in refusals.items():
        for action, status, code in asks:
            body = await system.call("POST", f"/workflow-runs/{run_id}/{action}", key, expect=status)
            assert body["error"]["code"] == code, (action, body)

    await ui.sign_in(key)
    shown = {completed: ("COMPLETED", "completed"), errors_only: ("COMPLETED_WITH_ERRORS", "only-ERROR-files"),
             maxed: ("COMPLETED_WITH_ERRORS", "retries-used-up"), cancelled: ("CANCELLED", "cancelled")}
    for run_id, (status, label) in shown.items():
        await ui.open_run(run_id)
        detail = ui.detail()
        await expect(detail.locator("h2 .badge")).to_have_text(status)
        await expect(page.get_by_test_id("files-table").locator("tbody tr")).to_have_count(2)
        # Not one action button: no Continue / Recover / Cancel, no per-file Retry / Skip.
        await expect(detail.locator("button"), f"buttons offered on the {label} run").to_have_count(0)
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


# Records, in the page, each 401 answer the dashboard has read (its handling runs in the
# microtasks right after, so once a poll sees it recorded, the dashboard has reacted to it).
RECORD_401 = """
const read = Response.prototype.text;
window.__read401 = [];
Response.prototype.text = async function () {
  const body = await read.call(this);
  if (this.status === 401) window.__read401.push(this.url);
  return body;
};
"""


async def test_a_refused_key_is_asked_for_again_and_a_good_one_works(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    bad = "rk_not_a_key"
    for path in ("/api/v1/workflow-runs", "/api/v1/admin/attention", "/api/v1/settings/retry",
                 "/api/v1/admin/breakers", "/api/v1/webhook/deliveries", "/api/v1/events",
                 "/api/v1/notifications", "/api/v1/me"):
        ui.allow_http_error(401, path)
    # One request made with the refused key is held until the good key's session is up:
    # its late 401 must not sign the good key out.
    release = asyncio.Event()

    async def hold_refused(route):
        if bad in (route.request.headers.get("authorization") or ""):
            await release.wait()
        await route.continue_()

    await page.add_init_script(RECORD_401)
    await page.route("**/api/v1/admin/breakers", hold_refused)
    try:
        await page.goto(ui.url + "/")
        await page.get_by_test_id("api-key-input").fill(bad)
        await page.get_by_test_id("api-key-submit").click()
        await expect(page.locator("#key-hint")).to_contain_text("The API refused the key")
        await expect(page.get_by_test_id("key-form")).to_be_visible()
        await expect(page.locator("#app")).to_be_hidden()
        await expect(page.get_by_test_id("error-banner")).to_be_hidden()  # the form says it; no banner too

        await page.get_by_test_id("api-key-input").fill(key)
        await page.get_by_test_id("api-key-submit").click()
        await expect(page.get_by_test_id("key-form")).to_be_hidden()
        await expect(page.get_by_test_id("live-indicator")).to_have_text("live", timeout=WAIT_MS)
        await expect(page.get_by_test_id("breakers")).to_contain_text("No breakers yet")
    finally:
        release.set()
    await page.wait_for_function("() => window.__read401.some((u) => u.includes('/admin/breakers'))")
    await expect(page.get_by_test_id("key-form")).to_be_hidden()
    await expect(page.locator("#app")).to_be_visible()
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()
    await expect(page.get_by_test_id("settings-form")).to_be_visible()  # a tenant_admin's panel
    await expect(page.get_by_test_id("runs-table")).to_contain_text("No runs.")
    await expect(page.locator("#webhook-panel")).to_be_hidden()  # no failed deliveries
    assert await page.evaluate("localStorage.getItem('redrive.apiKey')") == key


async def test_skip_and_cancel_act_through_the_api(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    detail = ui.detail()
    # Skip: a file FAILED on an optional step goes on with the step after it.
    optional = await system.template(key, [
        {"name": "enrich", "handler": "flaky", "params": {"fail_rounds": 9}, "optional": True},
        {"name": "store", "handler": "noop"}])
    skip_run = (await system.submit(key, optional, ["only"]))["id"]
    assert (await system.finished(key, skip_run))["files"][0]["skippable"] is True  # the setup
    # Cancel: a file whose first attempt fails waits a minute for its retry, so the run
    # stays RUNNING (deterministically) until cancelled.
    await system.call("PUT", "/settings/retry", key, json={**FAST, "backoff_base_ms": 60000,
                                                           "backoff_max_ms": 60000, "jitter": False})
    slow = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"fail_attempts": 1}}])
    cancel_run = (await system.submit(key, slow, ["waits"]))["id"]

    await ui.sign_in(key)
    await ui.open_run(skip_run)
    await expect(page.get_by_test_id("retry-file-0")).to_be_visible()  # FAILED, retries left: both offered
    await page.get_by_test_id("skip-file-0").click()
    await expect(page.get_by_test_id("notice")).to_contain_text("Skip file 0: done.")
    await expect(detail.locator("h2 .badge")).to_have_text("COMPLETED", timeout=WAIT_MS)
    await expect(cell(ui.file_row(0), FILE_COLUMNS["status"])).to_have_text("SUCCEEDED")
    await expect(page.get_by_test_id("skip-file-0")).to_have_count(0)
    assert (await system.run(key, skip_run))["status"] == "COMPLETED"

    await ui.open_run(cancel_run)
    await expect(detail.locator("h2 .badge")).to_have_text("RUNNING")
    await expect(page.get_by_test_id("continue-button")).to_have_count(0)
    await expect(page.get_by_test_id("recover-button")).to_have_count(0)  # running and healthy
    dialogs: list[str] = []

    async def answer(dialog, accept: bool):
        dialogs.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", lambda d: answer(d, False))
    await page.get_by_test_id("cancel-button").click()
    await expect(page.get_by_test_id("cancel-button")).to_be_enabled()
    assert len(dialogs) == 1 and cancel_run in dialogs[0]
    assert (await system.run(key, cancel_run))["status"] == "RUNNING"  # dismissed: nothing sent

    page.once("dialog", lambda d: answer(d, True))
    await page.get_by_test_id("cancel-button").click()
    await expect(page.get_by_test_id("notice")).to_contain_text("Cancel: done.")
    await expect(detail.locator("h2 .badge")).to_have_text("CANCELLED")
    await expect(cell(ui.file_row(0), FILE_COLUMNS["status"])).to_have_text("CANCELLED")
    await expect(meta(ui, "refunded")).to_have_text("1")
    await expect(detail.locator("button")).to_have_count(0)
    cancelled = await system.run(key, cancel_run)
    assert cancelled["status"] == "CANCELLED" and cancelled["credits"]["refunded"] == 1
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


async def notifications(system, key: str, count: int, query: str = "") -> list[dict]:
    """The tenant's notifications, newest first, once the notifier stored ``count`` of them."""
    deadline = asyncio.get_running_loop().time() + 20
    while len(items := (await system.call("GET", "/notifications" + query, key))["items"]) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(items)} notifications, not {count}: {items}"
        await asyncio.sleep(0.05)
    return items


def note_row(ui, notification_id: str):
    return ui.page.get_by_test_id("notifications").locator(f'tr[data-notification-id="{notification_id}"]')


NOTE_COLUMNS = {"run": 1, "file": 2, "message": 3}


def note_text(row, part: str):
    """A notification's message ("text") or kind ("kind"), both in its message column."""
    return cell(row, NOTE_COLUMNS["message"]).locator("." + part)


async def test_notifications_arrive_live_link_to_their_run_and_are_marked_read(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    template = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"fail_rounds": 9}}])
    await ui.sign_in(key)
    listed = page.get_by_test_id("notifications")
    await expect(listed).to_have_text("No notifications.")
    await expect(page.get_by_test_id("unread-count")).to_be_hidden()
    await expect(page.get_by_test_id("notifications-unread")).to_have_text("(0 unread)")

    # Its one file fails after its retries: "Step failed after multiple attempts", then the
    # run finishes with errors. Both are told while the page is open.
    run_id = (await system.submit(key, template, ["doomed.txt"], max_retry_count=1))["id"]
    assert (await system.finished(key, run_id))["status"] == "COMPLETED_WITH_ERRORS"  # the setup
    stored = await notifications(system, key, 2)
    assert {n["kind"] for n in stored} == {"file_failed", "run_completed_with_errors"}  # the setup

    # Listed without a reload (pushed live as `event: notification`; the list is polled only every 30 s).
    await expect(listed.locator("tbody tr")).to_have_count(2, timeout=WAIT_MS)
    for n in stored:
        r = note_row(ui, n["id"])
        await expect(r).to_have_class(re.compile(r"\bunread\b"))
        await expect(note_text(r, "kind")).to_have_text(n["kind"])
        await expect(note_text(r, "text")).to_have_text(n["message"])
        await expect(cell(r, NOTE_COLUMNS["run"]).get_by_role("link")).to_have_attribute("href", f"#run={run_id}")
    failed = next(n for n in stored if n["kind"] == "file_failed")
    assert failed["message"].startswith("Step failed after multiple attempts")
    await expect(cell(note_row(ui, failed["id"]), NOTE_COLUMNS["file"])).to_have_text("0")
    await expect(page.get_by_test_id("unread-count")).to_have_text("2")
    await expect(page.get_by_test_id("notifications-unread")).to_have_text("(2 unread)")

    # Marked read: the count drops, the row is read, and the API agrees.
    await note_row(ui, failed["id"]).get_by_test_id("mark-read").click()
    await expect(page.get_by_test_id("unread-count")).to_have_text("1")
    await expect(page.get_by_test_id("notifications-unread")).to_have_text("(1 unread)")
    await expect(note_row(ui, failed["id"])).not_to_have_class(re.compile(r"\bunread\b"))
    await expect(note_row(ui, failed["id"]).get_by_test_id("mark-read")).to_have_count(0)
    unread = (await system.call("GET", "/notifications?unread=true", key))["items"]
    assert [n["id"] for n in unread] == [n["id"] for n in stored if n["id"] != failed["id"]]

    # Unread only: the one left. Its link opens the run.
    await page.get_by_test_id("notifications-unread-only").check()
    await expect(listed.locator("tbody tr")).to_have_count(1)
    await expect(note_row(ui, unread[0]["id"])).to_be_visible()
    await note_row(ui, unread[0]["id"]).get_by_role("link").click()
    await expect(ui.detail().locator("h2 .mono")).to_have_text(run_id)

    # A reload shows what the API keeps, newest first.
    await page.get_by_test_id("notifications-unread-only").uncheck()
    await page.reload()
    await expect(listed.locator("tbody tr")).to_have_count(2)
    ids = await listed.locator("tbody tr").evaluate_all("rows => rows.map((r) => r.dataset.notificationId)")
    assert ids == [n["id"] for n in stored]
    await expect(page.get_by_test_id("unread-count")).to_have_text("1")
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def test_a_pushed_notification_is_shown_once_and_escaped(system, dashboard):
    tenant, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    noop = await system.template(key, [{"name": "work", "handler": "noop"}])
    run_id = (await system.submit(key, noop, ["a"]))["id"]
    await system.finished(key, run_id)
    [done] = await notifications(system, key, 1)
    # The event stream, faked once: the stored notification pushed again (twice), and one not
    # listed yet whose words are markup. Then the stream is held, so nothing refetches the list.
    hostile = {"id": "n-pushed", "at": "2999-01-01T00:00:00+00:00", "kind": "<b>file_failed</b>", "run_id": run_id,
               "file_index": 0, "message": '<img src=x onerror="window.__xss=1">Step failed', "read": False,
               "tenant_id": tenant}
    pushed = sse("notification", {**done, "tenant_id": tenant}) + sse("notification", hostile) \
        + sse("notification", {**done, "tenant_id": tenant}) + sse("notification", hostile)
    faked, release = False, asyncio.Event()

    async def events(route):
        nonlocal faked
        if faked:
            await release.wait()
            await route.continue_()
            return
        faked = True
        await route.fulfill(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"},
                            body=": connected\n\n" + pushed)

    await page.route("**/api/v1/events", events)
    try:
        await page.goto(ui.url + "/")
        await page.get_by_test_id("api-key-input").fill(key)
        await page.get_by_test_id("api-key-submit").click()
        rows = page.get_by_test_id("notifications").locator("tbody tr")
        await expect(rows).to_have_count(2)
        ids = await rows.evaluate_all("rows => rows.map((r) => r.dataset.notificationId)")
        assert ids == ["n-pushed", done["id"]]  # prepended, each once
        await expect(page.get_by_test_id("unread-count")).to_have_text("2")
        new = note_row(ui, "n-pushed")
        await expect(note_text(new, "text")).to_have_text(hostile["message"])
        await expect(note_text(new, "kind")).to_have_text(hostile["kind"])
        await expect(new.locator("img, b")).to_have_count(0)
        assert await page.evaluate("window.__xss") is None
        await expect(page.get_by_test_id("events-feed")).to_contain_text("notification")

        await note_row(ui, done["id"]).get_by_test_id("mark-read").click()
        await expect(page.get_by_test_id("unread-count")).to_have_text("1")
        assert (await system.call("GET", "/notifications?unread=true", key))["items"] == []
    finally:
        release.set()
    # Connected for real: the list is fetched again, and is what the API keeps.
    await expect(page.get_by_test_id("live-indicator")).to_have_text("live", timeout=WAIT_MS)
    await expect(rows).to_have_count(1)
    await expect(page.get_by_test_id("unread-count")).to_be_hidden()
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


async def test_restore_is_offered_to_support_only_and_resumes_from_the_checkpoint(system, dashboard):
    tenant, admin = await system.tenant()
    support = await system.key(tenant, "platform_admin", "support")
    member = await system.key(tenant, "member")
    ui, page = dashboard, dashboard.page
    detail = ui.detail()
    for path in ("/api/v1/admin/attention", "/api/v1/settings/retry"):  # refused to the member: their panels hide
        ui.allow_http_error(403, path)
    # Step 0 succeeds; step 1 fails in round 0 and succeeds in any later one. So both files
    # end FAILED with their checkpoint at step 0, and whatever is restored then succeeds.
    template = await system.template(admin, [{"name": "fetch", "handler": "noop"},
                                             {"name": "parse", "handler": "flaky", "params": {"fail_rounds": 1}}])
    run_id = (await system.submit(admin, template, ["a", "b"], max_retry_count=1))["id"]
    run = await system.finished(admin, run_id)
    assert run["status"] == "COMPLETED_WITH_ERRORS"  # the setup
    assert [(f["status"], f["checkpoint_step"]) for f in run["files"]] == [("FAILED", 0), ("FAILED", 0)]

    # Restore is support's (platform_admin): a member and a tenant admin are not offered it.
    for key, who in ((member, "member"), (admin, "tenant_admin")):
        await ui.sign_in(key)
        await ui.open_run(run_id)
        await expect(detail.locator("h2 .badge")).to_have_text("COMPLETED_WITH_ERRORS")
        await expect(ui.file_row(1)).to_be_visible()
        await expect(detail.locator('[data-testid^="restore-"]'), f"restore offered to a {who}").to_have_count(0)
        # Continue and Retry file are a tenant admin's: a member, who may only read and start
        # runs, is offered no action at all (the API would refuse each with a 403).
        if who == "member":
            await expect(detail.locator("button"), "actions offered to a member").to_have_count(0)
        else:
            await expect(page.get_by_test_id("continue-button")).to_be_visible()
            await expect(page.get_by_test_id("retry-file-1")).to_be_visible()
        body = await system.call("POST", f"/admin/workflow-runs/{run_id}/restore", key, expect=403,
                                 json={"checkpoint_step": 0})
        assert body["error"]["code"] == "forbidden"  # as the API says
        await page.get_by_test_id("sign-out").click()

    await ui.sign_in(support)
    # First a view that is out of date (it says the files reached step 1): the API refuses
    # the restore, and the dashboard shows why, as it does for every button.
    ui.allow_http_error(400, f"/api/v1/admin/workflow-runs/{run_id}/restore")

    stale_view = True

    async def stale(route):
        if not stale_view:
            await route.continue_()
            return
        response = await route.fetch()
        body = await response.json()
        for f in body["files"]:
            f["checkpoint_step"] = 1
        await route.fulfill(response=response, json=body)

    def run_url(url: str) -> bool:
        return urlsplit(url).path == f"/api/v1/workflow-runs/{run_id}"

    await page.route(run_url, stale)
    await ui.open_run(run_id)
    picker = page.get_by_test_id("restore-file-0-step")
    await expect(picker.locator("option")).to_have_text(["from the start", "after step 0 (fetch)", "after step 1 (parse)"])
    await expect(picker).to_have_value("1")  # the latest checkpoint
    dialogs: list[str] = []

    async def answer(dialog, accept: bool):
        dialogs.append(dialog.message)
        await (dialog.accept() if accept else dialog.dismiss())

    page.once("dialog", lambda d: answer(d, True))
    await page.get_by_test_id("restore-file-0").click()
    banner = page.get_by_test_id("error-banner")
    await expect(banner).to_be_visible()
    await expect(page.locator("#banner-code")).to_have_text("400 bad_request")
    await expect(page.locator("#banner-msg")).to_have_text("Restore file 0: file 0 has no checkpoint at step 1")
    assert (await system.run(admin, run_id))["round"] == 0  # nothing restored
    stale_view = False  # (not unrouted: a handler still running would then answer a request handled)
    # The banner stays until an action is done: then it is not about what is shown any more.

    # The view as it is: each file's checkpoints, up to step 0. Dismissed: nothing sent.
    await expect(picker.locator("option")).to_have_text(["from the start", "after step 0 (fetch)"], timeout=WAIT_MS)
    await expect(page.get_by_test_id("restore-file-1")).to_be_visible()
    await expect(page.get_by_test_id("restore-run-step").locator("option")).to_have_count(2)
    page.once("dialog", lambda d: answer(d, False))
    await page.get_by_test_id("restore-file-0").click()
    await expect(page.get_by_test_id("restore-file-0")).to_be_enabled()
    assert "file 0 of run " + run_id in dialogs[-1] and "after step 0 (fetch)" in dialogs[-1]
    assert (await system.run(admin, run_id))["round"] == 0

    # Restore file 0 from its checkpoint: it is PENDING again and the run RUNNING (what the
    # API answered), then file 0 succeeds.
    page.once("dialog", lambda d: answer(d, True))
    async with page.expect_response(lambda r: r.url.endswith(f"/workflow-runs/{run_id}/restore")) as answered:
        await page.get_by_test_id("restore-file-0").click()
    restored = await (await answered.value).json()
    assert restored["status"] == "RUNNING" and restored["files"][0]["status"] == "PENDING"
    assert restored["files"][1]["status"] == "FAILED"
    assert json.loads((await answered.value).request.post_data) == {"checkpoint_step": 0, "file_index": 0}
    await expect(page.get_by_test_id("notice")).to_contain_text(f"Restore file 0: done. Run {run_id[:8]} is RUNNING")
    await expect(banner).to_be_hidden()
    await expect(cell(ui.file_row(0), FILE_COLUMNS["status"])).to_have_text("SUCCEEDED", timeout=WAIT_MS)
    await expect(detail.locator("h2 .badge")).to_have_text("COMPLETED_WITH_ERRORS", timeout=WAIT_MS)
    await expect(cell(ui.file_row(1), FILE_COLUMNS["status"])).to_have_text("FAILED")
    await expect(page.get_by_test_id("timeline")).to_contain_text("restored")

    # The whole run, from the start: every file runs every step again, and all succeed.
    await page.get_by_test_id("restore-run-step").select_option("-1")
    page.once("dialog", lambda d: answer(d, True))
    await page.get_by_test_id("restore-run").click()
    assert f"every file of run {run_id} from the start" in dialogs[-1]
    await expect(page.get_by_test_id("notice")).to_contain_text("Restore run: done.")
    await expect(detail.locator("h2 .badge")).to_have_text("COMPLETED", timeout=WAIT_MS)
    done = await system.run(admin, run_id)
    assert done["status"] == "COMPLETED" and done["round"] == 2
    assert [f["status"] for f in done["files"]] == ["SUCCEEDED", "SUCCEEDED"]
    timeline = (await system.call("GET", f"/workflow-runs/{run_id}/timeline", admin))["items"]
    assert [(e.get("file_index"), e["details"]["checkpoint_step"]) for e in timeline if e["kind"] == "restored"] \
        == [(0, 0), (None, -1)]
    await expect(banner).to_be_hidden()


async def flagged_runs(system, key: str, count: int) -> list[str]:
    """``count`` runs that need attention, reason ``failed``: the one file of each failed
    after its retries (quick ones: FAST), so each finished COMPLETED_WITH_ERRORS."""
    doomed = await system.template(key, [{"name": "work", "handler": "flaky", "params": {"fail_rounds": 9}}])
    ids = [r["id"] for r in await asyncio.gather(
        *(system.submit(key, doomed, [f"doomed-{i}.txt"], max_retry_count=1) for i in range(count)))]
    for run in await asyncio.gather(*(system.finished(key, run_id) for run_id in ids)):
        assert (run["status"], run["needs_attention"], run["attention_reason"]) \
            == ("COMPLETED_WITH_ERRORS", True, "failed"), run  # the setup
    return ids


def attention_rows(page):
    return page.get_by_test_id("attention").locator("tbody tr")


async def attention_shown(page) -> list[tuple[str, str, str]]:
    """(run id, status, reason) of each run the panel lists, in its order."""
    return [tuple(r) for r in await attention_rows(page).evaluate_all(
        "rows => rows.map((r) => [r.querySelector('a').title, r.querySelector('.badge').textContent,"
        " r.querySelector('.tag').textContent])")]


async def test_an_operator_sees_what_needs_attention_with_its_reason_and_the_true_total(system, dashboard):
    tenant, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    noop = await system.template(key, [{"name": "work", "handler": "noop"}])
    fine = (await system.submit(key, noop, ["fine.txt"]))["id"]
    flagged = await flagged_runs(system, key, 51)  # one more than the dashboard reads at first (50)
    assert (await system.finished(key, fine))["needs_attention"] is False  # the setup
    first = await system.call("GET", "/admin/attention?limit=50", key)
    assert (first["total"], len(first["items"]), first["by_tenant"]) == (51, 50, {tenant: 51})  # the setup
    assert first["next_cursor"] and {r["id"] for r in first["items"]} < set(flagged)

    await ui.sign_in(key)
    await expect(attention_rows(page)).to_have_count(50)
    # The count is how many need attention (the API's total), not how many one page holds.
    await expect(page.locator("#attention-count")).to_have_text(f"({first['total']})")
    # The runs of the API's first page, newest change first, each with its status and reason.
    assert await attention_shown(page) == [(r["id"], r["status"], r["reason"]) for r in first["items"]]
    assert {reason for _, _, reason in await attention_shown(page)} == {"failed"}
    await expect(page.get_by_test_id("attention-shown")).to_have_text("50 of 51 shown")
    await expect(page.get_by_test_id("attention-more")).to_be_visible()
    await expect(page.get_by_test_id("attention-tenants")).to_be_hidden()  # one tenant's runs
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()


async def test_more_pages_through_what_needs_attention_and_the_count_stays_the_total(system, dashboard):
    _, key = await system.tenant()
    ui, page = dashboard, dashboard.page
    await flagged_runs(system, key, 5)
    every = await system.call("GET", "/admin/attention?limit=500", key)
    assert every["total"] == 5 and every["next_cursor"] is None  # the setup
    expected = [(r["id"], r["status"], r["reason"]) for r in every["items"]]

    await ui.sign_in(key)
    pages: list[dict] = []
    page.on("request", lambda r: "/api/v1/admin/attention" in r.url and pages.append(
        dict(p.split("=", 1) for p in urlsplit(r.url).query.split("&") if p)))
    await page.goto(ui.url + "/?attention_page=2")  # two runs a page
    rows, more, shown = attention_rows(page), page.get_by_test_id("attention-more"), page.get_by_test_id("attention-shown")
    count = page.locator("#attention-count")
    await expect(rows).to_have_count(2)
    await expect(count).to_have_text("(5)")
    await expect(shown).to_have_text("2 of 5 shown")
    await more.click()
    await expect(rows).to_have_count(4)
    await expect(shown).to_have_text("4 of 5 shown")
    await expect(count).to_have_text("(5)")
    await more.click()
    await expect(rows).to_have_count(5)
    await expect(more).to_be_hidden()  # no next_cursor: nothing more to read
    await expect(shown).to_have_text("")
    await expect(count).to_have_text("(5)")
    assert await attention_shown(page) == expected  # each once, in the API's order
    # Each More asked for a page of two, from where the one before ended.
    assert [p["limit"] for p in pages if "cursor" in p] == ["2", "2"]

    # A run flagged meanwhile: the list is read again live, as far as it had been paged.
    [late] = await flagged_runs(system, key, 1)
    await expect(count).to_have_text("(6)", timeout=WAIT_MS)
    await expect(rows).to_have_count(5)
    await expect(shown).to_have_text("5 of 6 shown")
    await expect(more).to_be_visible()
    assert [r[0] for r in await attention_shown(page)] == [late] + [r[0] for r in expected[:4]]
    await expect(page.get_by_test_id("error-banner")).to_be_hidden()
