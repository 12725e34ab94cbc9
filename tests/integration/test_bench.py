"""`redrive bench` end to end on a small run: it runs, stays exact, and reports its figures."""

from __future__ import annotations

import asyncio
import json


async def test_a_small_bench_is_exact_and_reports_every_figure(make_settings, monkeypatch, tmp_path, capsys):
    from bench.e2e import main as bench_main

    settings = await make_settings(migrate=False)  # the bench migrates its database itself
    monkeypatch.setenv("NATS_URL", settings.nats_url)
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("REDRIVE_PREFIX", settings.prefix)
    # As `redrive bench --json`: one JSON document, every round's figures in it.
    result = await asyncio.to_thread(bench_main, files=60, handler="noop", data_dir=tmp_path / "bench", repeat=1,
                                     rounds_shown=False)
    printed = json.loads(capsys.readouterr().out)
    assert printed["every_round"] == [result["median_round"]] and printed["exact"] is result["exact"]
    assert result["exact"] is True
    round_ = result["median_round"]
    assert round_["files_per_s"] > 0 and 0 < round_["p50_ms"] <= round_["p99_ms"]
    assert set(round_["limit_by_variant"]) == set(round_["ratio_by_variant"]) == {"nats_py", "lean"}
    assert round_["ratio_to_limit"] == min(round_["ratio_by_variant"].values())
    phases = round_["phases_s"]
    assert 0 < phases["created"] and phases["first"] <= phases["last"] <= phases["finished"]
    assert round_["steady_files_per_s"] >= round_["files_per_s"] and round_["steady_ratio_to_limit"] > 0
    assert {"coordinator", "executor-0"} <= set(round_["cpu_us_per_file"])
    assert all(cost["hops"] > 0 for cost in round_["limit_cpu_us_per_file"].values())
    assert {"coordinator", "executor-0", "gateway", "billing", "notifier"} <= set(result["peak_rss_mb"])
