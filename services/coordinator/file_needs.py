"""What a template's steps need of every file (a download step without ``params.url``: each
file's ``url``), and the 422 for a run whose files lack it: refused when submitted, before
anything is charged, rather than those files ending ERROR after the run was paid for.

The executors know their handlers' needs; they say them when a template is made (its
``check_steps`` answer), and the template keeps them (``templates.file_needs``: step index
→ file fields). A template made while no executor answered needs nothing: its files are
judged when they run, as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from shared.messages import ServiceError
from shared.requests import FILE_FIELDS as FIELDS, FileIn

# FIELDS, the file fields a step may need, are also the columns of coordinator.staged_files
# that the query below names: only these ever reach its SQL.
# Field errors named in one 422: enough to see the pattern, not 100,000 of them.
SHOWN = 20


def readable(raw: object, steps: int) -> dict[str, list[str]]:
    """An executor's ``file_needs`` answer, keeping only what is well formed: step indices
    of this template, known fields."""
    if not isinstance(raw, dict):
        return {}
    needs = {}
    for key, fields in raw.items():
        if isinstance(key, str) and key.isdigit() and int(key) < steps and isinstance(fields, list):
            known = [f for f in FIELDS if f in fields]
            if known:
                needs[key] = known
    return needs


def _needed(template: dict) -> dict[str, str]:
    """Each needed field, and which step needs it (the first that does). Not an optional
    step's: a file that lacks what it needs ends ERROR there, and may be skipped past it
    (a template may mean exactly that: "download when there is a url")."""
    steps = template["steps"]
    out: dict[str, str] = {}
    for key, fields in sorted((template.get("file_needs") or {}).items(), key=lambda kv: int(kv[0])):
        step = steps[int(key)] if int(key) < len(steps) else {}
        if step.get("optional"):
            continue
        for field in fields:
            out.setdefault(field, f"step {key} ({step.get('name')!r}, handler {step.get('handler')!r}) "
                                  f"needs each file's {field}")
    return out


def _refuse(missing: list[tuple[int, str]], count: int, needed: dict[str, str]) -> None:
    if missing:
        raise ServiceError(
            "validation_error", f"{count} file(s) lack what the template's steps need",
            {"fields": {f"files.{i}.{field}": needed[field] for i, field in missing[:SHOWN]}, "files_lacking": count},
        )


def _lacks(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())  # "" names nothing either


def refuse_lacking(template: dict, files: Iterable[tuple[int, FileIn]]) -> None:
    """A 422 when a file lacks a field a step needs (see the module)."""
    needed = _needed(template)
    if not needed:
        return
    missing, count = [], 0
    for i, f in files:
        lacking = [(i, field) for field in needed if _lacks(getattr(f, field))]
        count += bool(lacking)
        missing.extend(lacking)
    _refuse(missing, count, needed)


async def refuse_lacking_staged(conn: AsyncConnection, tenant_id: str, upload_id: str, template: dict) -> None:
    """The same for files sent ahead (staged_files.py), asked of the table they wait in."""
    needed = _needed(template)
    if not needed:
        return
    lacks = " OR ".join(f"{field} IS NULL" if field == "size" else f"coalesce(btrim({field}), '') = ''"
                        for field in FIELDS if field in needed)
    where = f"upload_id = :u AND tenant_id = :t AND ({lacks})"
    params = {"u": upload_id, "t": tenant_id}
    count = (await conn.execute(text(f"SELECT count(*) FROM coordinator.staged_files WHERE {where}"), params)).scalar_one()
    if not count:
        return
    rows = (await conn.execute(text(
        f"SELECT idx, {', '.join(f for f in FIELDS if f in needed)} FROM coordinator.staged_files "
        f"WHERE {where} ORDER BY idx LIMIT {SHOWN}"), params)).mappings().all()
    _refuse([(r["idx"], field) for r in rows for field in needed if _lacks(r[field])], count, needed)
