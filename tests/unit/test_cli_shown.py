"""What the CLI prints of names people typed: text, never rich markup, and no control
character reaches the terminal (one would be obeyed: a title change, colours, a bell)."""

from __future__ import annotations

from redrive.cli_common import console
from redrive.run_view import print_run


def test_a_file_name_with_markup_and_escape_sequences_is_printed_as_plain_text():
    run = {"id": "r1", "status": "FAILED", "round": 0, "mode": "per_file", "max_retry_count": 3,
           "counts": {"total": 2, "failed": 2}, "credits": {},
           "files": [{"index": 0, "name": "a[/b]\x1b]0;pwned\x07", "status": "FAILED", "attempts": 1, "retry_attempt": 0,
                      "last_error": {"class": "X", "message": "said \x1b[31mred\x9b"}},
                     {"index": 1, "name": "[bold]b[/bold]", "status": "FAILED", "attempts": 1, "retry_attempt": 0}]}
    with console.capture() as captured:
        print_run(run)
    out = captured.get()
    assert "a[/b]?]0;pwned?" in out and "[bold]b[/bold]" in out and "said ?[31mred?" in out
    assert not any(ch in out for ch in "\x1b\x07\x9b")
