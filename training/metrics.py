"""Scores for `evaluation.evaluate`: accuracy, make accuracy, logo gate, calibration, and the reports."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import cv2
import numpy as np

from carrecog.v1 import recognition_service_pb2 as pb
from common.plugins import BrandPlugin

ECE_BINS = 10


def truth_key(row: dict) -> tuple[str, str, int]:
    return row["make"], row["model"], int(row["year"])


def label_text(key: tuple[str, str, int]) -> str:
    return f"{key[0]} {key[1]} {key[2]}"


class Scores:
    """Collects one model's (or the pipeline's) answers against the truth."""

    def __init__(self, name: str, plugins: dict[str, BrandPlugin]) -> None:
        self.name = name
        self.plugins = plugins
        self.truth: list[tuple] = []
        self.top1: list[tuple | None] = []
        self.top5_hit: list[bool] = []
        self.confidence: list[float] = []
        self.make_hit: list[bool] = []
        self.top_class_hit: list[bool] = []  # top_k[0] instead of the (make-first) answer
        self.top_class_make_hit: list[bool] = []
        self.logo_fired: list[bool] = []
        self.logo_right: list[bool] = []
        self.routes: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()

    def add_all(self, rows: list[dict], results: list[pb.RecognizeResult]) -> None:
        for row, result in zip(rows, results):
            truth = truth_key(row)
            self.truth.append(truth)
            if result.WhichOneof("outcome") == "error":
                self.errors[result.error.code_name] += 1
                self.top1.append(None)
                self.top5_hit.append(False)
                self.confidence.append(0.0)
                self.make_hit.append(False)
                self.top_class_hit.append(False)
                self.top_class_make_hit.append(False)
                self.logo_fired.append(False)
                continue
            r = result.response
            keys = [(p.make, p.model, p.year) for p in r.top_k]
            self.top1.append((r.make, r.model, r.year))  # the answer (make first), not always top_k[0]
            self.top5_hit.append(truth in keys[:5])
            self.confidence.append(r.confidence)
            self.make_hit.append(r.make == truth[0])
            self.top_class_hit.append(keys[0] == truth)
            self.top_class_make_hit.append(keys[0][0] == truth[0])
            self.routes[pb.Route.Name(r.route)] += 1
            self.logo_fired.append(r.logo_matched)
            if r.logo_matched:
                plugin = self.plugins.get(r.logo.brand)
                self.logo_right.append(bool(plugin and truth[0] in plugin.makes))

    def correct(self) -> np.ndarray:
        return np.array([t == p for t, p in zip(self.truth, self.top1)], bool)

    def ece(self) -> float:
        return expected_calibration_error(np.array(self.confidence), self.correct())

    def summary(self, with_logo: bool) -> dict:
        n = len(self.truth)
        out = {"n": n, "top1": _mean(self.correct()), "top5": _mean(self.top5_hit), "make_top1": _mean(self.make_hit),
               "ece": round(self.ece(), 4), "errors": dict(self.errors),
               # what answering top_k[0] would have scored (the answer picks the make first)
               "top_class_top1": _mean(self.top_class_hit), "top_class_make_top1": _mean(self.top_class_make_hit)}
        if with_logo:
            fired = int(sum(self.logo_fired))
            out.update(logo_fired=round(fired / n, 4) if n else 0.0,
                       logo_precision=round(sum(self.logo_right) / fired, 4) if fired else None,
                       logo_fired_count=fired, routes=dict(self.routes))
        return out

    def per_class(self) -> dict[str, dict]:
        hits: dict[tuple, list[bool]] = collections.defaultdict(list)
        for t, ok in zip(self.truth, self.correct()):
            hits[t].append(bool(ok))
        return {label_text(k): {"n": len(v), "top1": _mean(v)} for k, v in sorted(hits.items())}

    def confused_pairs(self, k: int = 15) -> list[tuple[str, str, int]]:
        pairs = collections.Counter((label_text(t), label_text(p)) for t, p in zip(self.truth, self.top1)
                                    if p is not None and t != p)
        return [(a, b, c) for (a, b), c in pairs.most_common(k)]

    def confusion_png(self, path: Path) -> None:
        classes = sorted(set(self.truth))
        index = {c: i for i, c in enumerate(classes)}
        matrix = np.zeros((len(classes), len(classes)), np.float32)
        for t, p in zip(self.truth, self.top1):
            if p in index:
                matrix[index[t], index[p]] += 1
        matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
        cell = max(1, 800 // max(len(classes), 1))
        image = cv2.resize((matrix * 255).astype(np.uint8), None, fx=cell, fy=cell, interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(path), cv2.applyColorMap(255 - image, cv2.COLORMAP_BONE))

    def reliability_png(self, path: Path) -> None:
        conf, hit = np.array(self.confidence), self.correct()
        size, margin = 400, 30
        canvas = np.full((size + 2 * margin, size + 2 * margin, 3), 255, np.uint8)
        width = size // ECE_BINS
        for b in range(ECE_BINS):
            mask = np.minimum((conf * ECE_BINS).astype(int), ECE_BINS - 1) == b
            if mask.any():
                height = int(hit[mask].mean() * size)
                x = margin + b * width
                cv2.rectangle(canvas, (x + 2, margin + size - height), (x + width - 2, margin + size), (180, 120, 40), -1)
        cv2.line(canvas, (margin, margin + size), (margin + size, margin), (0, 0, 200), 1)  # perfect calibration
        cv2.rectangle(canvas, (margin, margin), (margin + size, margin + size), (0, 0, 0), 1)
        cv2.putText(canvas, f"{self.name}: accuracy per confidence bin, ECE {self.ece():.3f}", (margin, 20),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
        cv2.imwrite(str(path), canvas)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """ECE of top-1 confidences over ECE_BINS equal-width bins (training and evaluation share it)."""
    bins = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    return float(sum(abs(confidence[bins == b].mean() - correct[bins == b].mean()) * (bins == b).mean()
                     for b in range(ECE_BINS) if (bins == b).any()))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the val negative log-likelihood of softmax(logits / T)."""
    def nll(t):
        z = logits / t
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))
    grid = np.exp(np.linspace(np.log(0.3), np.log(5.0), 200))
    return float(grid[np.argmin([nll(t) for t in grid])])


def _mean(values) -> float:
    values = list(values)
    return round(float(np.mean(values)), 4) if values else 0.0


def write_reports(scores: dict, out: Path, n: int) -> dict:
    """report.json, report.md, and the PNGs beside them; returns the JSON dict."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline: Scores = scores["pipeline"]
    report = {"n": n, "pipeline": pipeline.summary(with_logo=True),
              "models": {name: s.summary(with_logo=False) for name, s in scores["models"].items()},
              "global_restricted": scores.get("global_restricted", {}),
              "per_class": {"pipeline": pipeline.per_class()},
              "confused_pairs": {"pipeline": pipeline.confused_pairs()}}
    out.write_text(json.dumps(report, indent=1))
    stem = out.with_suffix("")
    lines = [f"# carrecog evaluation ({n} photos)", "",
             "| scored | n | top-1 | top-5 | make top-1 | ECE | top-1 / make top-1 of top_k[0] |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in [("pipeline", report["pipeline"]), *report["models"].items()]:
        lines.append(f"| {name} | {s['n']} | {s['top1']:.3f} | {s['top5']:.3f} | {s['make_top1']:.3f} | {s['ece']:.3f} "
                     f"| {s['top_class_top1']:.3f} / {s['top_class_make_top1']:.3f} |")
    if report["global_restricted"]:
        lines += ["", "Each partial (brand) model against the global model restricted to the same classes, "
                  "on the same photos:", "", "| model | n | its top-1 | global restricted top-1 |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {r['n']} | {report['models'][name]['top1']:.3f} | {r['top1']:.3f} |"
                  for name, r in report["global_restricted"].items()]
    p = report["pipeline"]
    lines += ["", f"Logo gate fired on {p['logo_fired']:.1%} of photos ({p['logo_fired_count']}); precision when fired: "
              f"{p['logo_precision']}. Routes: {p['routes']}.", "", "## Most confused pairs (truth → predicted, count)", ""]
    lines += [f"- {a} → {b}: {c}" for a, b, c in report["confused_pairs"]["pipeline"]]
    for name, s in [("pipeline", pipeline), *scores["models"].items()]:
        s.confusion_png(Path(f"{stem}.{name}.confusion.png"))
        s.reliability_png(Path(f"{stem}.{name}.reliability.png"))
        lines += ["", f"![{name} confusion]({stem.name}.{name}.confusion.png) ![{name} reliability]({stem.name}.{name}.reliability.png)"]
    lines += ["", "## Per-class top-1 (pipeline)", "", "| class | n | top-1 |", "| --- | --- | --- |"]
    lines += [f"| {c} | {v['n']} | {v['top1']:.2f} |" for c, v in report["per_class"]["pipeline"].items()]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return report
