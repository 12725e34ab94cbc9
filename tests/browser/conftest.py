"""The dashboard in a real Chromium (Playwright, async API) against a real in-process redrive.

One browser per session, one stack (with the gateway) per module, a fresh browser context
(so a fresh localStorage: the dashboard asks for a key) and page per test. A test fails
when the page threw an uncaught error or logged a console error it did not expect.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import aiohttp
import pytest

from shared.db import make_engine
from services.gateway.identity import create_key, create_tenant
from tests.install_browser import HOW, PLAYWRIGHT_OWN, find_browser
from tests.stack import Stack

# Quick retries so a failing file is FAILED within a fraction of a second.
FAST = {"auto_retries": 1, "backoff_base_ms": 10, "backoff_max_ms": 20, "jitter": True,
        "breaker_failure_threshold": 50, "breaker_reset_s": 1}
WAIT_MS = 15_000  # for what arrives through the live events (or, at worst, the 5 s polling)


@pytest.fixture(scope="session")
async def browser():
    # Playwright is imported in the fixtures, not at the top: a conftest that fails to import
    # would stop every test of the suite, not only these.
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[test]'", pytrace=False)
    try:
        path = find_browser(include_playwright=False)
    except LookupError as exc:
        pytest.fail(str(exc), pytrace=False)
    pw = await async_playwright().start()
    try:
        try:
            if path and path != PLAYWRIGHT_OWN:
                found = await pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
            else:  # none on PATH: Playwright's own Chromium, if it downloaded one
                found = await pw.chromium.launch(args=["--no-sandbox"])
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            pytest.fail(f"{HOW} [{path or 'Playwright own Chromium'}: {first}]", pytrace=False)
        yield found
        await found.close()
    finally:
        await pw.stop()


@dataclass
class System:
    stack: Stack
    url: str
    http: aiohttp.ClientSession
    engine: object

    async def tenant(self, *, monthly: int = 100, fast: bool = True) -> tuple[str, str]:
        """A new tenant (its own runs, settings, ledger) and a tenant_admin key for it."""
        tenant = await create_tenant(self.engine, "browser")
        await self.stack.call("billing", "open_account", tenant_id=tenant, monthly_allowance=monthly)
        key = await create_key(self.engine, tenant, "tenant_admin", "operator")
        if fast:
            await self.call("PUT", "/settings/retry", key, json=FAST)
        return tenant, key

    async def key(self, tenant: str, role: str, user: str = "browser") -> str:
        """Another key of ``tenant``, with ``role``."""
        return await create_key(self.engine, tenant, role, user)

    async def call(self, method: str, path: str, key: str, expect: int | None = 200, **kw):
        headers = {"Authorization": f"Bearer {key}", **kw.pop("headers", {})}
        async with self.http.request(method, "/api/v1" + path, headers=headers, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            if expect is not None:
                assert r.status == expect, (method, path, r.status, body)
            return body

    async def template(self, key: str, steps: list[dict]) -> str:
        return (await self.call("POST", "/templates", key, 201, json={"name": "t", "steps": steps}))["id"]

    async def submit(self, key: str, template: str, names: list[str], **kw) -> dict:
        body = {"template_id": template, "files": [{"name": n} for n in names], **kw}
        return await self.call("POST", "/workflow-runs", key, 201, json=body)

    async def run(self, key: str, run_id: str) -> dict:
        return await self.call("GET", f"/workflow-runs/{run_id}", key)

    async def finished(self, key: str, run_id: str, timeout: float = 20) -> dict:
        """The run once it stopped RUNNING (asked through the API until then)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while (run := await self.run(key, run_id))["status"] == "RUNNING":
            assert asyncio.get_running_loop().time() < deadline, f"run {run_id} still RUNNING: {run['counts']}"
            await asyncio.sleep(0.05)
        return run

    async def ledger(self, key: str) -> list[dict]:
        return (await self.call("GET", "/credits/ledger?limit=500", key))["items"]


@pytest.fixture(scope="module")
async def system(make_settings):
    settings = await make_settings(port=0)
    stack = await Stack(settings).start("billing", "coordinator", "executor", "notifier", "gateway")
    engine = make_engine(settings, pool_size=1)
    url = f"http://127.0.0.1:{stack.services['gateway'][0].port}"
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            yield System(stack, url, http, engine)
    finally:
        await engine.dispose()
        await stack.stop()


# Chromium logs every non-2xx fetch as a console error; a test names the ones it provokes.
_HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@dataclass
class Dashboard:
    page: object
    url: str
    problems: list[str] = field(default_factory=list)
    allowed: set[tuple[int, str]] = field(default_factory=set)  # (status, path the request ended with)

    def allow_http_error(self, status: int, path: str) -> None:
        self.allowed.add((status, path))

    def _console(self, msg) -> None:
        if msg.type != "error":
            return
        m = _HTTP_ERROR.search(msg.text)
        where = (msg.location or {}).get("url", "")
        if m and any(int(m.group(1)) == s and where.split("?")[0].endswith(p) for s, p in self.allowed):
            return
        self.problems.append(f"console error: {msg.text} ({where})")

    async def sign_in(self, key: str) -> None:
        from playwright.async_api import expect

        await self.page.goto(self.url + "/")
        await expect(self.page.get_by_test_id("key-form")).to_be_visible()
        await self.page.get_by_test_id("api-key-input").fill(key)
        await self.page.get_by_test_id("api-key-submit").click()
        await expect(self.page.get_by_test_id("key-form")).to_be_hidden()
        await expect(self.page.get_by_test_id("live-indicator")).to_have_text("live", timeout=WAIT_MS)

    def run_row(self, run_id: str):
        return self.page.locator(f'#runs-table tr[data-run-id="{run_id}"]')

    def detail(self):
        return self.page.get_by_test_id("run-detail")

    def file_row(self, index: int):
        return self.page.locator(f'[data-testid="files-table"] tr[data-file-index="{index}"]')

    async def open_run(self, run_id: str) -> None:
        """Select a run by clicking its link in the runs list."""
        from playwright.async_api import expect

        await expect(self.run_row(run_id)).to_be_visible(timeout=WAIT_MS)
        await self.run_row(run_id).get_by_role("link").click()
        await expect(self.detail().locator("h2 .mono")).to_have_text(run_id)


@pytest.fixture
async def dashboard(browser, system):
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(10_000)
    page = await context.new_page()
    ui = Dashboard(page, system.url)
    page.on("pageerror", lambda exc: ui.problems.append(f"uncaught: {exc}"))
    page.on("console", ui._console)
    try:
        yield ui
        assert not ui.problems, "the dashboard reported errors:\n" + "\n".join(ui.problems)
    finally:
        await context.close()
