"""What one tenant or one anonymous caller can hold of the shared gateway: live event
streams capped per key and per tenant (429 past them, a slot free again when its stream
ends), /metrics behind a token when the operator sets one, and a dashboard that cannot be
framed and runs only its own inline script and style.

A real gateway over real NATS and PostgreSQL; no other service is needed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
from html.parser import HTMLParser

import aiohttp
import pytest

from shared.db import make_engine
from services.gateway.bootstrap import build
from services.gateway.identity import authenticate, create_key, create_tenant

PER_KEY, PER_TENANT = 2, 3
TOKEN = "metrics-" + "t0k3n" * 6


@pytest.fixture(scope="module")
async def limited(make_settings):
    """Two gateways on one system: ``http`` with small stream caps and a metrics token,
    ``public`` as installed by default (no token)."""
    settings = await make_settings(port=0, sse_max_per_key=PER_KEY, sse_max_per_tenant=PER_TENANT,
                                   metrics_token=TOKEN)
    engine = make_engine(settings, pool_size=2)
    acme = await create_tenant(engine, "acme")
    other = await create_tenant(engine, "other")
    keys = {name: await create_key(engine, acme, "member", name) for name in ("k1", "k2", "k3")}
    keys["other"] = await create_key(engine, other, "member", "o")
    key_ids = {name: (await authenticate(engine, key)).key_id for name, key in keys.items()}
    gateway = await build(settings)
    await gateway.start()
    public = await build(settings.model_copy(update={"metrics_token": None}))
    await public.start()
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http, \
            aiohttp.ClientSession(base_url=f"http://127.0.0.1:{public.port}") as public_http:
        yield {"http": http, "public": public_http, "gateway": gateway, "public_gateway": public, "keys": keys,
               "key_ids": key_ids, "acme": acme, "other": other}
    await public.stop()
    await gateway.stop()
    await engine.dispose()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Streams:
    """Live-event streams held open by the test, closed at its end whatever happens."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http
        self.open: list[aiohttp.ClientResponse] = []

    async def connect(self, key: str) -> aiohttp.ClientResponse:
        """A stream, read up to ': connected'; or the refusal, its body read."""
        resp = await self.http.get("/api/v1/events", headers=auth(key))
        if resp.status != 200:
            await resp.read()
            resp.release()
            return resp
        self.open.append(resp)
        assert (await asyncio.wait_for(resp.content.readline(), 10)) == b": connected\n"
        return resp

    def close(self, resp: aiohttp.ClientResponse) -> None:
        self.open.remove(resp)
        resp.close()  # drops the connection, as a browser tab that goes away

    def close_all(self) -> None:
        for resp in list(self.open):
            self.close(resp)


@contextlib.asynccontextmanager
async def streams(http):
    held = Streams(http)
    try:
        yield held
    finally:
        held.close_all()


async def freed(hub, *, left: int = 0, **who) -> None:
    """Until the gateway holds at most ``left`` streams of ``who`` (bounded: it notices a
    client that went away within a second)."""
    async with asyncio.timeout(10):
        while hub.streams_of(**who) > left:
            await asyncio.sleep(0.02)


async def refusal(resp: aiohttp.ClientResponse) -> dict:
    assert resp.status == 429, resp.status
    assert resp.content_type == "application/json"
    assert int(resp.headers["Retry-After"]) > 0
    error = json.loads(await resp.text())["error"]
    assert error["code"] == "too_many_requests" and set(error) == {"code", "message", "details"}
    return error


# ---- live event streams ---------------------------------------------------------------------


async def test_a_key_gets_at_most_its_share_of_streams_and_a_freed_slot_is_usable_again(limited):
    http, keys, hub = limited["http"], limited["keys"], limited["gateway"].hub
    async with streams(http) as held:
        first = [await held.connect(keys["k1"]) for _ in range(PER_KEY)]
        assert [r.status for r in first] == [200] * PER_KEY
        error = await refusal(await held.connect(keys["k1"]))
        assert "REDRIVE_SSE_MAX_PER_KEY" in error["message"] and f"{PER_KEY} live event streams" in error["message"]
        assert error["details"] == {"limit": PER_KEY, "per": "key"}
        assert hub.streams_of(key_id=limited["key_ids"]["k1"]) == PER_KEY  # the refused one holds nothing

        held.close(first[0])
        await freed(hub, key_id=limited["key_ids"]["k1"], left=PER_KEY - 1)
        again = await held.connect(keys["k1"])
        assert again.status == 200  # the slot it left is usable again
        await refusal(await held.connect(keys["k1"]))  # and the cap still holds
    await freed(hub, key_id=limited["key_ids"]["k1"])


async def test_a_tenant_gets_at_most_its_share_of_streams_whatever_its_keys_and_others_are_not_affected(limited):
    http, keys, hub = limited["http"], limited["keys"], limited["gateway"].hub
    async with streams(http) as held:
        opened = [await held.connect(keys[k]) for k in ("k1", "k1", "k2")]
        assert [r.status for r in opened] == [200] * PER_TENANT
        error = await refusal(await held.connect(keys["k3"]))  # a fresh key, but the tenant is full
        assert "REDRIVE_SSE_MAX_PER_TENANT" in error["message"]
        assert error["details"] == {"limit": PER_TENANT, "per": "tenant"}
        assert (await held.connect(keys["other"])).status == 200  # another tenant streams on
        held.close(opened[2])
        await freed(hub, key_id=limited["key_ids"]["k2"])
        assert (await held.connect(keys["k3"])).status == 200
    await freed(hub, tenant_id=limited["acme"])


async def test_concurrent_requests_cannot_overshoot_the_cap(limited):
    http, keys, hub = limited["http"], limited["keys"], limited["gateway"].hub
    async with streams(http) as held:
        answers = await asyncio.gather(*(held.connect(keys["k2"]) for _ in range(8)))
        assert sorted(r.status for r in answers) == [200] * PER_KEY + [429] * (8 - PER_KEY)
        assert hub.streams_of(key_id=limited["key_ids"]["k2"]) == PER_KEY
    await freed(hub, key_id=limited["key_ids"]["k2"])


# ---- /metrics ---------------------------------------------------------------------------------


async def test_metrics_need_the_token_when_one_is_set_and_stay_public_otherwise(limited, monkeypatch):
    http, gateway = limited["http"], limited["gateway"]
    refreshed = []
    original = gateway.deps.system.refresh

    async def counting():
        refreshed.append(1)
        await original()

    monkeypatch.setattr(gateway.deps.system, "refresh", counting)
    api_key = limited["keys"]["k1"]  # an API key is not the metrics token
    for headers in ({}, auth("wrong"), auth(TOKEN[:-1]), auth(TOKEN + "x"), auth(api_key), {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        r = await http.get("/metrics", headers=headers)
        body = json.loads(await r.text())
        assert r.status == 401 and body["error"]["code"] == "unauthorized", headers
        assert "REDRIVE_METRICS_TOKEN" in body["error"]["message"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "redrive_" not in await r.text()
    assert (await http.head("/metrics")).status == 401
    assert refreshed == []  # no scrape of the services for an unauthorised caller

    r = await http.get("/metrics", headers=auth(TOKEN))
    assert r.status == 200 and "redrive_http_requests_total" in await r.text()
    assert refreshed == [1]

    # No token set (the default, as the contract has it): public, whatever is sent.
    for headers in ({}, auth("anything")):
        r = await limited["public"].get("/metrics", headers=headers)
        assert r.status == 200 and "redrive_http_requests_total" in await r.text()


# ---- the dashboard ------------------------------------------------------------------------------


class _Inline(HTMLParser):
    """The text of each inline <script> and <style>, as a browser hashes it."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.blocks: dict[str, list[str]] = {"script": [], "style": []}
        self._in: str | None = None
        self._src = False

    def handle_starttag(self, tag, attrs):
        if tag in self.blocks:
            self._in, self._src = tag, any(name == "src" for name, _ in attrs)
            if not self._src:
                self.blocks[tag].append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in and not self._src:
            self.blocks[self._in][-1] += data


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


async def test_the_dashboard_cannot_be_framed_and_runs_only_its_own_inline_code(limited):
    for http in (limited["http"], limited["public"]):
        r = await http.get("/")
        page = await r.text()
        assert r.status == 200 and "redrive — operations" in page
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        csp = {d.split()[0]: d.split()[1:] for d in (p.strip() for p in r.headers["Content-Security-Policy"].split(";"))
               if d}
        assert csp["default-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
        assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
        assert csp["object-src"] == ["'none'"]
        assert "'unsafe-inline'" not in r.headers["Content-Security-Policy"]
        assert "'unsafe-eval'" not in r.headers["Content-Security-Policy"]

        parser = _Inline()
        parser.feed(page)
        scripts, styles = parser.blocks["script"], parser.blocks["style"]
        assert scripts and styles  # the page has both: each is allowed by its hash, nothing else is
        assert sorted(csp["script-src"]) == sorted(_sha256(s) for s in scripts)
        assert sorted(csp["style-src"]) == sorted(_sha256(s) for s in styles)

        # Revalidation (Cache-Control: no-cache) answers 304 with the same headers.
        assert r.headers["Cache-Control"] == "no-cache" and r.headers["ETag"]
        again = await http.get("/", headers={"If-None-Match": r.headers["ETag"]})
        assert again.status == 304 and again.headers["Content-Security-Policy"] == r.headers["Content-Security-Policy"]
        assert again.headers["X-Frame-Options"] == "DENY"


def test_the_policy_hashes_follow_the_page():
    from services.gateway.app import dashboard_headers

    page = "<style>b{}</style><script>go()</script><script src='/x.js'></script><SCRIPT>\r\nb()</SCRIPT>"
    csp = dashboard_headers(page)["Content-Security-Policy"]
    assert re.search(r"script-src ('sha256-[^']+' ?){2};", csp)
    assert _sha256("go()") in csp and _sha256("\nb()") in csp and _sha256("b{}") in csp
    plain = dashboard_headers("<p>no code</p>")["Content-Security-Policy"]
    assert "script-src 'none'" in plain and "style-src 'none'" in plain
