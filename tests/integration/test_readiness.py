"""/readyz answers 503 when PostgreSQL is unreachable or NATS does not answer (and says
which dependency)."""

import os
import signal

import aiohttp
import nats as nats_py

from services.gateway import app
from shared.round_trip import RoundTrip
from services.gateway.bootstrap import build
from shared.embedded import EmbeddedNats, free_port


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


async def test_readyz_is_503_while_nats_is_hung_and_200_once_it_answers(make_settings, tmp_path, monkeypatch):
    """A stopped server keeps its connections open: only a round trip shows it is gone."""
    monkeypatch.setattr(app, "READY_TIMEOUT_S", 0.5)
    nats = EmbeddedNats(tmp_path / "nats").start()
    settings = (await make_settings(port=0)).model_copy(update={"nats_url": nats.url})
    gateway = await build(settings)
    await gateway.start()
    try:
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{gateway.port}") as http:
            # Someone listening to everything (`nats sub '>'`) changes nothing: the probe's
            # answer is the gateway's own.
            tap = await nats_py.connect(nats.url)
            await tap.subscribe(">", cb=_ignore)
            await tap.flush()
            assert (await http.get("/readyz")).status == 200
            await tap.close()
            os.kill(nats.pid, signal.SIGSTOP)
            try:
                r = await http.get("/readyz")
                assert r.status == 503 and (await r.json())["checks"] == {"nats": False, "database": True}
            finally:
                os.kill(nats.pid, signal.SIGCONT)
            # Answered again, and by a connection that still reads: a probe that timed out
            # must not have killed nats-py's read loop (flush(timeout) did: InvalidStateError
            # on the late PONG, then a connection that looked connected and read nothing).
            assert (await http.get("/readyz")).status == 200
            assert await RoundTrip(gateway.nc).answers(2.0)
    finally:
        await gateway.stop()
        nats.stop()


async def _ignore(msg) -> None:
    pass
