"""A run body larger than one bus message: its files go to the coordinator ahead, in parts
(``stage_files``), and the run is then created naming them (``staged``), so a run of
100,000 files is one POST as the contract has it, whatever the broker's max payload.

A part is at most half a message of files; a single file larger than that goes alone, and
if it does not fit either the request is a 413 (send large files by url)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import orjson

from shared.rpc import RpcClient


async def send_files_ahead(rpc: RpcClient, payload: dict[str, Any]) -> dict[str, Any]:
    """Stage ``payload``'s files; the create_run payload that names them instead."""
    files = payload["files"]
    upload_id = uuid.uuid4().hex
    caller = {"tenant_id": payload["tenant_id"], "actor": payload["actor"], "upload_id": upload_id}
    offset = 0
    for part in parts(files, rpc.max_payload // 2):
        await rpc.call("coordinator", "stage_files", {**caller, "offset": offset, "files": part})
        offset += len(part)
    run = {k: v for k, v in payload.items() if k != "files"}
    run["staged"] = {"upload_id": upload_id, "count": len(files)}
    return run


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
