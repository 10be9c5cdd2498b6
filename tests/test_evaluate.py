"""`make evaluate` on a small real subset, against the session's real stack."""
from __future__ import annotations

import json

from common.data import data_dir
from router_service.settings import DEFAULT_GLOBAL_MODEL as GLOBAL
from evaluation.evaluate import main as evaluate_main

IDS = ["00274", "01752", "03205", "00160", "05353", "00001"]


def test_evaluate_writes_json_markdown_and_figures(router, tmp_path):
    source = data_dir() / "stanford_cars"
    lines = (source / "labels.csv").read_text().splitlines()
    subset = [lines[0]] + [line for line in lines[1:] if line.split(",")[0] in IDS]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(subset) + "\n")
    out = tmp_path / "out" / "report.json"
    assert evaluate_main(["--labels", str(labels), "--images-root", str(source), "--out", str(out),
                          "--router", router.address]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == len(IDS)
    pipeline = report["pipeline"]
    for key in ("top1", "top5", "make_top1", "logo_fired", "logo_precision"):
        assert 0.0 <= pipeline[key] <= 1.0
    # any labelled photos can be evaluated; these four fire against the shipped gallery (00274 is a train
    # photo now and matches itself, 05353 a twin among the exemplars), so the logo columns are exercised
    assert pipeline["logo_fired_count"] >= 3
    assert report["models"][GLOBAL]["n"] == report["models"]["global"]["n"] == len(IDS)
    # a brand model (a brand signature) is scored on its brand's photos only
    assert report["models"][f"{GLOBAL}:audi"]["n"] == 3
    assert report["global_restricted"][f"{GLOBAL}:audi"]["n"] == 3
    assert (tmp_path / "out" / "report.md").read_text().startswith("# carrecog evaluation")
    assert (tmp_path / "out" / "report.pipeline.confusion.png").stat().st_size > 0
    assert (tmp_path / "out" / f"report.{GLOBAL}.reliability.png").stat().st_size > 0
