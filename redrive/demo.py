"""`redrive demo`: on a running system (`redrive up`), a run whose files fail twice and
then succeed, so that the automatic retries can be watched (CLI, dashboard, /events)."""

from __future__ import annotations

import json
import time

import typer

from redrive.api_client import Api, ApiError
from shared.settings import Settings


def run_demo(settings: Settings, as_json: bool = False) -> None:
    """Progress lines as it goes; with ``as_json``, only the finished run and its dashboard link."""
    api = Api.from_settings(settings)
    say = (lambda text: None) if as_json else typer.echo
    try:
        api.call("POST", "/admin/tenants/platform/credits", {"purchased": 10}, idempotent=True)
        template = api.call("POST", "/templates", {
            "name": "demo: flaky OCR",
            "steps": [{"name": "ocr", "handler": "flaky", "params": {"fail_attempts": 2, "sleep_ms": 300}},
                      {"name": "hash", "handler": "checksum"}],
        }, idempotent=True)
        files = [{"name": f"invoice-{i}.pdf", "content_b64": "JVBERi0xLjQK"} for i in range(5)]
        run = api.call("POST", "/workflow-runs", {"template_id": template["id"], "files": files}, idempotent=True)
        say(f"run {run['id']}: {api.base_url}/#run={run['id']}")
        while run["status"] == "RUNNING":
            time.sleep(0.5)
            run = api.call("GET", f"/workflow-runs/{run['id']}")
            c = run["counts"]
            attempts = [f["attempts"] for f in run["files"]]
            say(f"  {run['status']}: {c['succeeded']}/{c['total']} succeeded, attempts so far {attempts}")
    except ApiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps({"dashboard": f"{api.base_url}/#run={run['id']}", "run": run}, indent=2, default=str))
        return
    typer.echo(f"done: {run['status']} (each file failed twice, retried with backoff, then succeeded)")
