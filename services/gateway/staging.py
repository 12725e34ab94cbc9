"""A run body larger than one bus message: its files go to the coordinator ahead, in parts
(``stage_files``), and the run is then created naming them (``staged``), so a run of
100,000 files is one POST as the contract has it, whatever the broker's max payload.

A part is at most half a message of files; a single file larger than that goes alone, and
if it does not fit either the request is a 413 (send large files by url).

Parts cost the shared database until the run takes them, so what can be refused is refused
before the first is sent: a template the tenant does not have (or archived), a file no
message carries. What only the coordinator knows (credits, the tenant's staged bytes) it
refuses there, and then deletes the upload itself (commands/staged_files.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from shared.bus import HEADERS_ROOM
from shared.messages import ServiceError
from shared.rpc import REQUEST_VERSION, RpcClient


async def send_files_ahead(rpc: RpcClient, payload: dict[str, Any]) -> dict[str, Any]:
    """Stage ``payload``'s files; the create_run payload that names them instead."""
    files = payload["files"]
    await _refuse_unknown_template(rpc, payload)
    # Drawn anew for each attempt, never from the Idempotency-Key: a refused create_run
    # deletes the upload it names, and that must never be the one a retry is sending.
    upload_id = uuid.uuid4().hex
    caller = {"tenant_id": payload["tenant_id"], "actor": payload["actor"], "upload_id": upload_id}
    cut = list(parts(files, rpc.max_payload // 2))
    _refuse_unsendable(cut, rpc.max_payload - _envelope_bytes(caller, len(files)))
    offset = 0
    for part in cut:
        await rpc.call("coordinator", "stage_files", {**caller, "offset": offset, "files": part})
        offset += len(part)
    run = {k: v for k, v in payload.items() if k != "files"}
    run["staged"] = {"upload_id": upload_id, "count": len(files)}
    return run


async def _refuse_unknown_template(rpc: RpcClient, payload: dict[str, Any]) -> None:
    """404 as create_run would answer it, before any part is sent: the coordinator's own
    read of the template (a template archived between this and the run is refused there, and
    the parts deleted)."""
    template_id = payload["template_id"]
    template = await rpc.call("coordinator", "get_template", {
        "tenant_id": payload["tenant_id"], "actor": payload["actor"], "template_id": template_id})
    if template.get("archived"):  # get_template shows archived ones; a run may not use them
        raise ServiceError("not_found", f"template {template_id} was not found", {"id": template_id})


def _envelope_bytes(caller: dict[str, Any], count: int) -> int:
    """A part's message but its files, with room for its headers (the broker counts them)."""
    return len(orjson.dumps({"v": REQUEST_VERSION, **caller, "offset": count, "files": []})) + HEADERS_ROOM


def _refuse_unsendable(cut: list[list[dict[str, Any]]], room: int) -> None:
    """413 for a file too large for a message on its own: only a part of one file can exceed
    the half message the others are cut to."""
    index = 0
    for part in cut:
        if len(part) == 1 and len(orjson.dumps(part)) > room:
            raise ServiceError("payload_too_large", f"file {index} is larger than the message bus carries; "
                               "send large files by url", {"file_index": index, "max_bytes": room})
        index += len(part)


def parts(files: list[dict[str, Any]], max_bytes: int) -> Iterator[list[dict[str, Any]]]:
    """Consecutive runs of ``files`` of at most ``max_bytes`` of JSON each (a larger file alone)."""
    part: list[dict[str, Any]] = []
    size = 1  # "[", then each file with its "," or "]"
    for f in files:
        n = len(orjson.dumps(f)) + 1
        if part and size + n > max_bytes:
            yield part
            part, size = [], 1
        part.append(f)
        size += n
    if part:
        yield part
