"""`redrive tenant create` against a real database: a name of up to 200 characters is
stored whole; a longer one, or one with a control character, creates nothing."""

from __future__ import annotations

import asyncpg

from tests.integration.test_cli import redrive


async def _names(settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return [r["name"] for r in await conn.fetch("SELECT name FROM gateway.tenants ORDER BY name")]
    finally:
        await conn.close()


async def test_tenant_names_are_bounded(make_settings):
    settings = await make_settings()
    before = await _names(settings)
    for name, said in (("n" * 201, "at most 200"), ("n" * 100_000, "at most 200"),
                       ("evil\x1b[2Jname", "control characters")):
        refused = redrive(settings, "tenant", "create", name)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr
        assert refused.stderr.strip().count("\n") == 0 and "Traceback" not in refused.stderr
    assert await _names(settings) == before

    made = redrive(settings, "tenant", "create", "n" * 200)
    assert made.returncode == 0, made.stderr
    assert "n" * 200 in await _names(settings)
