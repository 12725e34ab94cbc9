"""The README's handler example, as written there: it loads through REDRIVE_HANDLERS's
path, and does what its comments say (ERROR for a non-PDF, retry on 429 with the
server's Retry-After, the OCR text as output)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from services.executor.handlers.registry import HandlerRegistry
from shared.errors import PermanentError, TransientError, classify

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_handler_source() -> str:
    text = README.read_text()
    start = text.index("    # myapp/handlers.py\n")
    block = re.match(r"((?:    .*\n|\n)+)", text[start:]).group(1)
    return "\n".join(line[4:] for line in block.rstrip().splitlines()) + "\n"


@pytest.fixture
def myapp(tmp_path, monkeypatch):
    package = tmp_path / "myapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "handlers.py").write_text(readme_handler_source())
    monkeypatch.syspath_prepend(str(tmp_path))  # "put its parent directory on PYTHONPATH"
    registry = HandlerRegistry()
    registry.load_modules("myapp.handlers")
    yield registry, sys.modules["myapp.handlers"]
    for name in ("myapp.handlers", "myapp"):
        sys.modules.pop(name, None)


@pytest.fixture
async def ocr_service():
    answers: list[web.Response] = []

    async def ocr(request: web.Request) -> web.Response:
        assert (await request.json())["url"] == "https://files.example.com/a.pdf"
        return answers.pop(0)

    app = web.Application()
    app.router.add_post("/v1/ocr", ocr)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield str(server.make_url("/v1/ocr")), answers
    await server.close()


def ctx(name: str):
    return types.SimpleNamespace(file=types.SimpleNamespace(name=name, url=f"https://files.example.com/{name}"),
                                 params={})


async def test_the_readme_handler_loads_and_behaves_as_its_comments_say(myapp, ocr_service):
    registry, module = myapp
    url, answers = ocr_service
    module.OCR_URL = url
    handler = registry.get("ocr")
    assert handler.dependency_of({}, ctx("a.pdf").file) == "ocr-api"
    with pytest.raises(PermanentError, match="not a PDF"):
        await handler.run(ctx("notes.txt"))
    answers += [web.Response(status=429, headers={"Retry-After": "2"}), web.Response(status=503),
                web.Response(status=404), web.json_response({"text": "hello"})]
    with pytest.raises(TransientError) as limited:
        await handler.run(ctx("a.pdf"))
    assert limited.value.retry_after_s == 2.0
    for transient in (True, False):  # 503 is retried, 404 is the file's ERROR
        with pytest.raises(Exception) as failed:
            await handler.run(ctx("a.pdf"))
        assert classify(failed.value).transient is transient
    assert await handler.run(ctx("a.pdf")) == {"text": "hello"}
