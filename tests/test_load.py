"""The Locust load test (scripts/locustfile.py, `make load`), briefly, against the session's router.

Locust runs on gevent, so it runs as its own process, as `make load` runs it.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_locust_headless_against_the_router(router, tmp_path):
    report = tmp_path / "load"
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "scripts/locustfile.py", "--headless", "--users", "2",
         "--spawn-rate", "2", "--run-time", "4s", "--stop-timeout", "30", "--only-summary",
         "--csv", str(report), "--html", f"{report}.html"],
        cwd=ROOT, env={**os.environ, "ROUTER_ADDRESS": router.address}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(f"{report}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    assert int(rows["Recognize"]["Request Count"]) > 0, rows
    assert rows["Recognize"]["Type"] == "grpc"
    assert int(rows["Aggregated"]["Failure Count"]) == 0, rows
    assert Path(f"{report}.html").stat().st_size > 0
    [line] = [json.loads(x) for x in result.stdout.splitlines() if x.startswith('{"load"')]
    summary = line["load"]
    assert summary["requests"] >= int(rows["Recognize"]["Request Count"])
    assert summary["codes"] == {"OK": summary["requests"]}
    assert summary["per_second"] > 0 and 0 < summary["ms_p50"] <= summary["ms_p95"] <= summary["ms_p99"]
