"""/readyz answers 503 when PostgreSQL is unreachable (and says which dependency)."""

import aiohttp

from services.gateway.bootstrap import build
from shared.embedded import free_port


async def test_readyz_is_503_when_the_database_is_unreachable(make_settings):
    settings = await make_settings(port=0)
    settings = settings.model_copy(update={"database_url": f"postgresql://nobody@127.0.0.1:{free_port()}/none"})
    gateway = await build(settings)
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as http:
            r = await http.get(f"http://127.0.0.1:{gateway.port}/readyz")
            assert r.status == 503 and (await r.json())["checks"] == {"nats": True, "database": False}
            assert r.headers["Retry-After"] == "2"
            assert (await http.get(f"http://127.0.0.1:{gateway.port}/healthz")).status == 200
    finally:
        await gateway.stop()
