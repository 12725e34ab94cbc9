"""A run body as a person reads it at a terminal: what it is, where it stands, what it cost,
and its files (``--json`` prints the API's body as is)."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Column, Table

from redrive.cli_common import console, shown

_COUNTS = ("succeeded", "failed", "errored", "pending", "skipped", "cancelled")


def say(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True)


def print_run(run: dict[str, Any]) -> None:
    c, cr = run.get("counts") or {}, run.get("credits") or {}
    attention = f"  needs attention: {run.get('attention_reason') or 'yes'}" if run.get("needs_attention") else ""
    # Whole lines (soft_wrap): an id cut at the terminal's edge could not be copied.
    say(f"run {run.get('id')}  [bold]{run.get('status')}[/bold]  round {run.get('round')}  {run.get('mode')}  "
        f"max_retry_count {run.get('max_retry_count')}{attention}")
    say(f"files {c.get('total', 0)}: " + ", ".join(f"{c.get(k, 0)} {k}" for k in _COUNTS if c.get(k)))
    say(f"credits consumed {cr.get('consumed', 0)}, refunded {cr.get('refunded', 0)}")
    files = run.get("files") or []
    if not files:
        return
    # Index and status are read whole; names and errors fold into what width is left.
    table = Table(Column("#", no_wrap=True, justify="right"), Column("name", overflow="fold"),
                  Column("status", no_wrap=True, min_width=max(len(str(f.get("status"))) for f in files)),
                  Column("attempts", no_wrap=True, justify="right"), Column("retry", no_wrap=True, justify="right"),
                  Column("last error", overflow="fold"), box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    for f in files:
        # A file that succeeded in the end keeps its last failure in the API (its history),
        # but "last error" beside SUCCEEDED reads as if something were wrong.
        error = (f.get("last_error") or {}) if f.get("status") not in ("SUCCEEDED", "CANCELLED") else {}
        said = f"{error.get('class', '')}: {error.get('message', '')}".strip(": ") if error else ""
        table.add_row(str(f.get("index")), shown(f.get("name")), str(f.get("status")), str(f.get("attempts")),
                      str(f.get("retry_attempt")), shown(said))
    console.print(table)
    page = run.get("files_page") or {}
    if page.get("next_offset") is not None:
        say(f"more files: --file-offset {page['next_offset']}")
