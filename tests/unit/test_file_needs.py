"""What a template's steps need of every file: said by the executor's registry, kept by the
coordinator only when well formed."""

from __future__ import annotations

from services.coordinator import file_needs
from services.executor.handlers.registry import HandlerRegistry, builtin_registry


async def _noop(ctx):
    return {}


def test_download_without_its_own_url_needs_each_files_url():
    registry = builtin_registry()
    steps = [{"handler": "noop"}, {"handler": "download"}, {"handler": "download", "params": {"url": "https://e.com/x"}},
             {"handler": "download", "params": "not a dict"}, "not a step", {"handler": "unknown"}]
    assert registry.file_needs(steps) == {"1": ["url"], "3": ["url"]}


def test_a_needs_function_that_fails_or_names_no_file_field_asks_for_nothing():
    registry = HandlerRegistry()

    def broken(params):
        raise RuntimeError("bug")

    registry.register("a", _noop, file_needs=broken)
    registry.register("b", _noop, file_needs=lambda params: ("colour", "sha256"))
    assert registry.file_needs([{"handler": "a"}, {"handler": "b"}]) == {"1": ["sha256"]}


def test_the_coordinator_keeps_only_known_fields_of_this_templates_steps():
    raw = {"0": ["url", "colour"], "1": ["colour"], "2": ["size"], "x": ["url"], "-1": ["url"], "0 ": ["url"]}
    assert file_needs.readable(raw, steps=2) == {"0": ["url"]}
    assert file_needs.readable(["url"], steps=2) == {} and file_needs.readable(None, steps=2) == {}


def test_an_optional_steps_needs_are_not_asked_of_every_file():
    from shared.requests import FileIn

    template = {"steps": [{"name": "get", "handler": "download", "optional": True}, {"name": "sum", "handler": "noop"}],
                "file_needs": {"0": ["url"]}}
    file_needs.refuse_lacking(template, [(0, FileIn(name="a", content_b64="QQ=="))])  # may end ERROR there, and be skipped
