"""`redrive demo`: on a running system (`redrive up`), a run whose files fail twice and
then succeed, so that the automatic retries can be watched (CLI, dashboard, /events)."""

from __future__ import annotations

import time

import typer

from redrive.api_client import Api, ApiError
from shared.settings import Settings


def run_demo(settings: Settings) -> None:
    api = Api.from_settings(settings)
    try:
        api.call("POST", "/admin/tenants/platform/credits", {"purchased": 10}, idempotent=True)
        template = api.call("POST", "/templates", {
            "name": "demo: flaky OCR",
            "steps": [{"name": "ocr", "handler": "flaky", "params": {"fail_attempts": 2, "sleep_ms": 300}},
                      {"name": "hash", "handler": "checksum"}],
        }, idempotent=True)
        files = [{"name": f"invoice-{i}.pdf", "content_b64": "JVBERi0xLjQK"} for i in range(5)]
        run = api.call("POST", "/workflow-runs", {"template_id": template["id"], "files": files}, idempotent=True)
        typer.echo(f"run {run['id']}: {api.base_url}/#run={run['id']}")
        while run["status"] == "RUNNING":
            time.sleep(0.5)
            run = api.call("GET", f"/workflow-runs/{run['id']}")
            c = run["counts"]
            attempts = [f["attempts"] for f in run["files"]]
            typer.echo(f"  {run['status']}: {c['succeeded']}/{c['total']} succeeded, attempts so far {attempts}")
    except ApiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)
    typer.echo(f"done: {run['status']} (each file failed twice, retried with backoff, then succeeded)")
