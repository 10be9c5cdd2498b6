"""Does the ResNet50 help the default? (issue 23, item 3; a measurement, nothing is exported)

    python -m training.ensemble_check [--out reports/ensemble_check.json] [--reuse] [--latency-photos 40]

Runs the served default (`efficientnet_lite0`, serving_default) and the ResNet50
(`global`, serving_default) on the raw bytes of every val and test photo in this
process, and scores three classifiers the way the router answers (make first:
router_service.routing.choose_answer):

- the default alone and the ResNet50 alone, as served (each already tempered by
  its own export);
- their ensemble: the mean of the two log-probabilities over the same 196 labels
  (aligned through each model's `labels` output), divided by one temperature
  fitted on val (training.metrics.fit_temperature), then softmax.

For each: val and test top-1, make top-1 and ECE (10 bins, of the answer's
confidence, as `make evaluate` computes them). Caveat written into the report:
one of the default v8's two members was trained on train + val, so the default's
val figures (and the ensemble's, and the temperature fitted on them) are not
held-out figures; test is the clean comparison. The ensemble temperature is
therefore also fitted by 2-fold cross-fitting on test, as a check on its ECE.

Latency: batch-1 calls on the same test photos, the two models interleaved
in one process (the ensemble's cost is both calls, one after the other), p50 and
mean in ms. The probabilities are cached beside the report (`--reuse` scores
them again without running the models).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from training.metrics import expected_calibration_error, fit_temperature
from dataset.split import load_split

ROOT = Path(__file__).resolve().parent.parent
SERVING = ROOT / "serving_models"
MODELS = {"default": "efficientnet_lite0", "resnet50": "global"}
BATCH = 16
FLOOR = 1e-12  # log of a probability the float32 softmax rounded to 0


def served_version(name: str) -> Path:
    return max((p for p in (SERVING / name).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def load(name: str):
    import tensorflow as tf

    path = served_version(name)
    return path, tf.saved_model.load(str(path)).signatures["serving_default"]


def run_model(serve, photos: list) -> tuple[np.ndarray, list[str]]:
    """Probabilities [N, C] and the model's label order."""
    import tensorflow as tf

    rows, labels = [], None
    for start in range(0, len(photos), BATCH):
        out = serve(image_bytes=tf.constant([p.path.read_bytes() for p in photos[start:start + BATCH]]))
        rows.append(out["probabilities"].numpy())
        if labels is None:
            labels = [s.decode() for s in out["labels"].numpy()[0]]
        print(f"  {min(start + BATCH, len(photos))}/{len(photos)}", end="\r", flush=True)
    print()
    return np.concatenate(rows), labels


def make_index(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    makes = sorted({label.split("|")[0] for label in labels})
    return np.array([makes.index(label.split("|")[0]) for label in labels]), makes


def router_answers(probabilities: np.ndarray, make_of_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(answer class, its probability) per row, as router_service.routing.choose_answer picks it."""
    totals = np.stack([probabilities[:, make_of_class == m].sum(1) for m in range(make_of_class.max() + 1)], 1)
    make = totals.argmax(1)
    masked = np.where(make_of_class[None, :] == make[:, None], probabilities, -1.0)
    answer = masked.argmax(1)
    return answer, probabilities[np.arange(len(answer)), answer]


def scores(probabilities: np.ndarray, truth: np.ndarray, make_of_class: np.ndarray) -> dict:
    answer, confidence = router_answers(probabilities, make_of_class)
    correct = answer == truth
    return {"n": int(len(truth)), "top1": round(float(correct.mean()), 4),
            "make_top1": round(float((make_of_class[answer] == make_of_class[truth]).mean()), 4),
            "ece": round(expected_calibration_error(confidence, correct), 4),
            "top_class_top1": round(float((probabilities.argmax(1) == truth).mean()), 4)}


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def ensemble_logits(p_a: np.ndarray, p_b: np.ndarray) -> np.ndarray:
    return (np.log(np.maximum(p_a, FLOOR)) + np.log(np.maximum(p_b, FLOOR))) / 2


def cross_fit_test_ece(z: np.ndarray, truth: np.ndarray, make_of_class: np.ndarray, seed: int = 0) -> dict:
    """Test ECE of the ensemble with its temperature fitted on the other half of test (2 folds)."""
    order = np.random.default_rng(seed).permutation(len(truth))
    halves = [order[: len(order) // 2], order[len(order) // 2:]]
    probabilities, temperatures = np.zeros_like(z), []
    for fit, score in (halves, halves[::-1]):
        t = fit_temperature(z[fit], truth[fit])
        temperatures.append(round(t, 3))
        probabilities[score] = softmax(z[score] / t)
    return {"temperatures": temperatures, **scores(probabilities, truth, make_of_class)}


def latency(serves: dict, photos: list, n: int) -> dict:
    """Batch-1 ms per call, the models interleaved photo by photo in this process."""
    import tensorflow as tf

    blobs = [p.path.read_bytes() for p in photos[:n]]
    for serve in serves.values():
        serve(image_bytes=tf.constant(blobs[:1]))  # trace and warm
    ms = {key: [] for key in serves}
    for blob in blobs:
        for key, serve in serves.items():
            started = time.perf_counter()
            serve(image_bytes=tf.constant([blob]))
            ms[key].append((time.perf_counter() - started) * 1000)
    both = [sum(row) for row in zip(*ms.values())]
    out = {key: {"p50_ms": round(statistics.median(v), 1), "mean_ms": round(statistics.mean(v), 1)}
           for key, v in {**ms, "ensemble (both, in sequence)": both}.items()}
    base = out["default"]["p50_ms"]
    for row in out.values():
        row["p50_vs_default"] = round(row["p50_ms"] / base, 2)
    return {"n": len(blobs), "batch": 1, "ms": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ensemble_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "ensemble_check.json")
    parser.add_argument("--reuse", action="store_true", help="score the cached probabilities (no model runs)")
    parser.add_argument("--latency-photos", type=int, default=40, help="batch-1 calls per model (0 = skip)")
    args = parser.parse_args(argv)
    cache = args.out.with_suffix(".probs.npz")
    split = load_split()
    photos = {s: [p for p in split if p.split == s] for s in ("val", "test")}
    serves, versions = {}, {}
    if args.reuse:
        data = np.load(cache, allow_pickle=False)
        probabilities = {(k, s): data[f"{k}_{s}"] for k in MODELS for s in photos}
        labels = {k: list(data[f"{k}_labels"]) for k in MODELS}
        versions = json.loads(str(data["versions"]))
    else:
        probabilities, labels = {}, {}
        for key, name in MODELS.items():
            path, serves[key] = load(name)
            versions[key] = f"{name}/{path.name}"
            for s, rows in photos.items():
                print(f"{versions[key]} on {s} ({len(rows)} photos)")
                probabilities[key, s], labels[key] = run_model(serves[key], rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, **{f"{k}_{s}": v for (k, s), v in probabilities.items()},
                            **{f"{k}_labels": np.array(v) for k, v in labels.items()}, versions=json.dumps(versions))
    # one label order: the default's; the ResNet50's columns permuted onto it
    order = labels["default"]
    assert sorted(order) == sorted(labels["resnet50"]) and len(order) == 196, "the two models' classes differ"
    permutation = np.array([labels["resnet50"].index(label) for label in order])
    for s in photos:
        probabilities["resnet50", s] = probabilities["resnet50", s][:, permutation]
    make_of_class, _ = make_index(order)
    truth = {s: np.array([order.index(f"{p.make}|{p.model}|{p.year}") for p in rows]) for s, rows in photos.items()}
    z = {s: ensemble_logits(probabilities["default", s], probabilities["resnet50", s]) for s in photos}
    temperature = fit_temperature(z["val"], truth["val"])
    candidates = {"default": {s: probabilities["default", s] for s in photos},
                  "resnet50": {s: probabilities["resnet50", s] for s in photos},
                  "ensemble": {s: softmax(z[s] / temperature) for s in photos}}
    report = {
        "command": "python -m training.ensemble_check" + (" --reuse" if args.reuse else ""),
        "models": versions, "signature": "serving_default",
        "ensemble": {"how": "softmax(mean(log p_default, log p_resnet50) / T), T fitted on val (val NLL)",
                     "temperature": round(temperature, 4)},
        "answer": "make first, as router_service.routing.choose_answer; top_class_top1 = argmax class",
        "caveat": "efficientnet_lite0 v8's CutMix member was trained on train + val: the default's and the "
                  "ensemble's val figures, and T, are not held out; test is the clean comparison",
        "scores": {name: {s: scores(p[s], truth[s], make_of_class) for s in photos} for name, p in candidates.items()},
        "ensemble_test_cross_fit": cross_fit_test_ece(z["test"], truth["test"], make_of_class),
    }
    if args.latency_photos and not args.reuse:
        report["latency"] = latency(serves, photos["test"], args.latency_photos)
    elif args.reuse and args.out.exists():  # keep what the run with the models measured
        report["latency"] = json.loads(args.out.read_text()).get("latency")
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'':10s} {'split':5s} {'n':>4s} {'top-1':>6s} {'make':>6s} {'ECE':>6s}")
    for name, per_split in report["scores"].items():
        for s, r in per_split.items():
            print(f"{name:10s} {s:5s} {r['n']:4d} {r['top1']:6.3f} {r['make_top1']:6.3f} {r['ece']:6.3f}")
    print(f"ensemble temperature (val) {temperature:.3f}; test with T cross-fitted on test: "
          f"{report['ensemble_test_cross_fit']}")
    if report.get("latency"):
        print("batch-1 latency, interleaved:", json.dumps(report["latency"]["ms"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
