"""Turning files that need work into job messages: as outbox rows, or (a run's first
publication) as one expansion row that the relay turns into jobs a page at a time.

Jobs are built as plain dicts and serialised once with orjson. tests/unit/test_wire.py
checks that what is built here parses as :class:`shared.messages.Job`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.bus import Outgoing, headers_for
from shared.tracing import run_trace_id
from shared.messages import RetryPolicy, StepSpec, job_id_for
from shared.subjects import Names
from services.coordinator import outbox
from services.coordinator.window import Window, room

_FILE_FIELDS = ("url", "content_b64", "size", "sha256")


def file_spec(f: Mapping[str, Any]) -> dict[str, Any]:
    spec = {"index": f["idx"], "name": f["name"]}
    for field in _FILE_FIELDS:
        if f.get(field) is not None:
            spec[field] = f[field]
    checkpoint = f.get("checkpoint_step")
    # Resume after the last completed step, with its output: never redo a step.
    spec["start_step"] = 0 if checkpoint is None else checkpoint + 1
    if f.get("checkpoint_output") is not None:
        spec["previous_output"] = f["checkpoint_output"]
    return spec


def job_messages(
    names: Names,
    run: Mapping[str, Any],
    template: Mapping[str, Any],
    files: Iterable[Mapping[str, Any]],
    policy: RetryPolicy,
    *,
    msg_suffix: str = "",
) -> list[Outgoing]:
    """Job messages for the given files of ``run`` in its current round.

    ``msg_suffix`` is empty for a round's first publication (so a repeated publish is
    deduped by JetStream); recovery adds one because the original message may be long gone
    (acked or terminated) while the dedupe window still remembers its id.
    """
    files = list(files)
    specs = [file_spec(f) for f in files]
    if not specs:
        return []
    common = {
        "v": 1, "run_id": run["id"], "tenant_id": run["tenant_id"], "template_id": run["template_id"],
        "mode": run["mode"], "round": run["round"], "generation": run.get("generation", 0),
        "steps": [StepSpec.model_validate(s).model_dump(exclude_none=True) for s in template["steps"]],
        "retry": policy.model_dump(),
    }
    subject = names.job(run["tenant_id"])
    trace_id = run_trace_id(run["id"], run.get("trace_id"))
    if run["mode"] == "batch":
        # One batch job per round its files are in, each of that round: a file retry or skip
        # moves the run to a new round while the other files are still PENDING in an earlier
        # one, and re-published under the run's round their results were all ignored (the
        # run never finished).
        by_round: dict[int, list[dict]] = {}
        for f, spec in zip(files, specs):
            by_round.setdefault(f.get("round", run["round"]), []).append(spec)
        batches = []
        for round_, round_specs in sorted(by_round.items()):
            job_id = job_id_for(run["id"], None, round_)
            body = orjson.dumps({**common, "round": round_, "job_id": job_id, "start_step": 0, "files": round_specs,
                                 "idempotency_key": job_id})
            batches.append(Outgoing(subject, body, job_id + msg_suffix,
                                    headers_for(job_id, run["tenant_id"], run["id"], trace_id)))
        return batches
    # The run's part of every job is serialised once: a job is that head and its own fields
    # (one JSON object, keys disjoint), which costs a third of building each whole.
    # A file's job carries the file's own round, not the run's: a single-file retry or restore
    # moves the run to a new round while other files are still PENDING in an earlier one, and
    # a re-published job of such a file must match its round or its results are ignored.
    heads = {run["round"]: orjson.dumps(common)[:-1] + b","}
    messages = []
    for f, spec in zip(files, specs):
        round_ = f.get("round", run["round"])
        if round_ not in heads:
            heads[round_] = orjson.dumps({**common, "round": round_})[:-1] + b","
        head = heads[round_]
        job_id = job_id_for(run["id"], spec["index"], round_)
        own = orjson.dumps({"job_id": job_id, "file_index": spec["index"], "start_step": spec["start_step"],
                            "file": spec, "idempotency_key": job_id})
        messages.append(Outgoing(subject, head + own[1:], job_id + msg_suffix,
                                 headers_for(job_id, run["tenant_id"], run["id"], trace_id)))
    return messages


def job_rows(names: Names, run: Mapping[str, Any], template: Mapping[str, Any], files: Iterable[Mapping[str, Any]],
             policy: RetryPolicy, *, msg_suffix: str = "") -> list[dict]:
    """:func:`job_messages` as outbox rows, written in the caller's transaction."""
    return [outbox.row(m.subject, m.msg_id, m.data, m.headers)
            for m in job_messages(names, run, template, files, policy, msg_suffix=msg_suffix)]


# ---- expansions: an outbox row that stands for all of a round's jobs -------------------------

def expansion_row(names: Names, run: Mapping[str, Any], policy: RetryPolicy, *, count: int,
                  rounds: tuple[int, int] | None = None, msg_suffix: str = "") -> dict:
    """One outbox row for the ``count`` PENDING files of ``run`` (per_file mode) in its
    current round, or in ``rounds`` (first, last): the relay builds their jobs a page at a
    time (:func:`expand_page`). ``msg_suffix`` as for :func:`job_messages`."""
    first, last = rounds if rounds is not None else (run["round"], run["round"])
    spec = {"run_id": run["id"], "round": last, "first_round": first, "policy": policy.model_dump(), "after_idx": -1,
            "published": 0, "count": count, "msg_suffix": msg_suffix}
    row = outbox.row(names.job(run["tenant_id"]), f"{run['id']}:jobs:r{last}{msg_suffix}", b"")
    row["expand"] = orjson.dumps(spec).decode()
    return row


def pending_rows(names: Names, run: Mapping[str, Any], template: Mapping[str, Any], files: list[Mapping[str, Any]],
                 policy: RetryPolicy, *, rounds: tuple[int, int], msg_suffix: str) -> list[dict]:
    """Jobs for ``files``, the PENDING files of ``run`` in ``rounds``: those Continue reopened,
    or those whose jobs may be lost or were stopped (recovery, a FAILED run reopened).
    per_file, one expansion row, so that they go out within the tenant's window (a stuck run
    of 100,000 files re-published at once would bury every other tenant's jobs); batch,
    the one job."""
    if run["mode"] == "batch" or not files:
        return job_rows(names, run, template, files, policy, msg_suffix=msg_suffix)
    return [expansion_row(names, run, policy, count=len(files), rounds=rounds, msg_suffix=msg_suffix)]


class Page(NamedTuple):
    """An expansion's next jobs, and its spec to go on with (None: the expansion is done).
    ``waiting``: nothing built, because the run's tenant has its window of jobs out already
    (see :func:`window.room`); the expansion stays as it was."""

    messages: list[Outgoing]
    next_spec: dict[str, Any] | None
    waiting: bool = False


def _published(spec: Mapping[str, Any]) -> int:
    # Rows from before ``published`` was kept: the index reached stands in (indexes run 0..n-1).
    return spec.get("published", spec["after_idx"] + 1)


_DROP_EXPANSIONS = text("DELETE FROM coordinator.outbox WHERE expand IS NOT NULL AND expand->>'run_id' = :run_id")


async def drop_expansions(conn: AsyncConnection, run_id: str) -> None:
    """Forget the run's expansions still in the outbox (waiting for room in its window),
    when every PENDING file of it is given a job at once (recovery): they would publish
    those files' jobs again."""
    await conn.execute(_DROP_EXPANSIONS, {"run_id": run_id})


_EXPAND_RUN = text(
    "SELECT r.id, r.tenant_id, r.template_id, r.mode, r.round, r.generation, r.status, r.trace_id, r.total, "
    "r.attention_reason, "
    "t.steps FROM coordinator.runs r JOIN coordinator.templates t ON t.id = r.template_id WHERE r.id = :run_id"
)
_FILE_COLUMNS = ("SELECT idx, round, name, url, content_b64, size, sha256, checkpoint_step, checkpoint_output "
                 "FROM coordinator.files WHERE run_id = :run_id AND round BETWEEN :first AND :last "
                 "AND status = 'PENDING' AND idx > :after")
# A page is read a span of indexes at a time (through the primary key: run_id, idx). Asked
# for "the next PENDING files after :after" alone, PostgreSQL judges from a table of mostly
# finished files that the run has few PENDING ones, and reads all of them to sort them (a
# 100,000-file run in a table of 20 million: 20-28 ms a page, instead of ~2).
_EXPAND_FILES_IN_SPAN = text(_FILE_COLUMNS + " AND idx <= :upto ORDER BY idx LIMIT :limit")
# Past the run's last index (indexes run 0..total-1): whatever is left, which is nothing
# unless a file was given an index beyond them; bounded by the primary key all the same.
_EXPAND_FILES_AFTER = text(_FILE_COLUMNS + " ORDER BY idx LIMIT :limit")
# Indexes per span at least: where PENDING files are few (a Continue of 10 failed files in
# 100,000), a page walks the run in spans of this many rows.
SPAN = 4096


async def _pending_files(conn: AsyncConnection, spec: Mapping[str, Any], total: int, limit: int) -> list[dict]:
    """Up to ``limit`` PENDING files of the expansion's round(s) after its ``after_idx``,
    in index order; fewer only when there are no more."""
    files: list[dict] = []
    params = {"run_id": spec["run_id"], "first": spec.get("first_round", spec["round"]), "last": spec["round"],
              "after": spec["after_idx"]}
    while len(files) < limit:
        wanted = limit - len(files)
        last_span = params["after"] >= total - 1
        if last_span:
            result = await conn.execute(_EXPAND_FILES_AFTER, {**params, "limit": wanted})
        else:
            upto = params["after"] + max(wanted, SPAN)
            result = await conn.execute(_EXPAND_FILES_IN_SPAN, {**params, "upto": upto, "limit": wanted})
        # Plain dicts: RowMapping lookups made up most of building a job (5 → 2 µs a file).
        columns = list(result.keys())
        found = [dict(zip(columns, row)) for row in result]
        files += found
        if last_span:
            break
        params["after"] = found[-1]["idx"] if len(found) == wanted else upto
    return files


async def expand_page(conn: AsyncConnection, spec: Mapping[str, Any], limit: int, *, names: Names,
                      window: int | Window | None = None) -> Page:
    """The next page of an expansion's jobs: at most ``limit``, and no more than its
    tenant's ``window`` allows (a fixed size, one that follows the executors' slots, or
    None: no window).

    Only files still PENDING in the expansion's round(s) of a RUNNING run are published: a
    run cancelled or stopped meanwhile publishes nothing more. A run that moved on to a later
    round meanwhile (a single-file retry or restore) still needs the jobs of the files left in
    this round: they are published with this round (the files' own, see job_messages).
    """
    run = (await conn.execute(_EXPAND_RUN, {"run_id": spec["run_id"]})).mappings().first()
    if run is None or run["status"] != "RUNNING":
        return Page([], None)
    if window is not None:
        if run["attention_reason"] == "breaker_open":  # not counted in the window: see window._TENANT_OUT
            return Page([], dict(spec), waiting=True)
        size = window if isinstance(window, int) else await window.size(conn)
        limit = min(limit, await room(conn, run["tenant_id"], size))
        if limit <= 0:
            return Page([], dict(spec), waiting=True)
    files = await _pending_files(conn, spec, run["total"], limit)
    messages = job_messages(names, run, {"steps": run["steps"]}, files, RetryPolicy.model_validate(spec["policy"]),
                            msg_suffix=spec.get("msg_suffix", ""))
    if len(files) < limit:
        return Page(messages, None)
    return Page(messages, {**spec, "after_idx": files[-1]["idx"], "published": _published(spec) + len(messages)})
