"""Calibrate the router's `uncertain` logo policy on VAL photos: below which make confidence to run the logo stage.

    python -m builders.logo_policy [--out router_service/logo_policy.json] [--model-dir runs/efficientnet_lite0-8-trainonly]

A model trained on train + val has seen val: calibrate with its train-only twin (--model-dir, the same
recipe exported from the train-only runs), whose val confidences are those of unseen photos.

The logo gate is chosen to be right at least 99 % of the time when it fires
(logo_service/calibration.json). Where the global model is at least that sure
of the make, a firing logo cannot improve the answer on average, and the logo
stage only costs CPU. So the threshold is the smallest make confidence t such
that the global model's make is right on at least TARGET of the val photos
answered with confidence >= t; the logo stage runs below t. The make
confidence is the router's own (`choose_answer`: a make's class probabilities
summed), computed by the served SavedModel from the photos' bytes.

Also written, for each candidate t: the share of photos that would go through
the logo stage (its cost), the model's make errors below t (what the logo
could fix), and the val pipeline make accuracy simulated with the val gate
firings recorded in calibration.json. Test photos are not looked at.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from common.plugins import DEFAULT_PLUGINS_DIR, brand_for_make, load_plugins
from router_service.settings import DEFAULT_GLOBAL_MODEL, DEFAULT_LOGO_POLICY_FILE
from router_service.tf_serving import Label, make_index
from builders.logo_calibrate import DEFAULT_OUT as LOGO_CALIBRATION
from dataset.split import data_dir, load_split

TARGET = 0.99  # the precision the logo gate is calibrated to
SERVING_MODELS = Path(__file__).resolve().parent.parent / "serving_models"
CANDIDATES = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999]


def latest_version(model: str) -> Path:
    versions = [p for p in (SERVING_MODELS / model).iterdir() if p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name))


def make_probabilities(model_dir: Path, paths: list[Path], batch: int = 32) -> tuple[list[str], np.ndarray]:
    """(the model's makes, sorted; [photos, makes] each make's class probabilities summed), computed by
    the served SavedModel from the photos' bytes, as the router sums them (`choose_answer`)."""
    serve = tf.saved_model.load(str(model_dir)).signatures["serving_default"]
    totals, makes = [], None
    for start in range(0, len(paths), batch):
        chunk = [p.read_bytes() for p in paths[start:start + batch]]
        out = serve(image_bytes=tf.constant(chunk))
        if makes is None:
            labels = [Label.parse(x.decode()) for x in out["labels"].numpy()[0]]
            index = make_index(labels)  # the index of each class's make among the sorted makes
            makes = sorted({label.make for label in labels})
        totals.extend(np.bincount(index, weights=row, minlength=len(makes)) for row in out["probabilities"].numpy())
        print(f"  {min(start + batch, len(paths))}/{len(paths)}", end="\r", file=sys.stderr, flush=True)
    return makes, np.array(totals)


def make_confidences(model_dir: Path, paths: list[Path]) -> tuple[list[str], np.ndarray]:
    """(answered make, make confidence) per photo, exactly as the router answers from this model."""
    makes, totals = make_probabilities(model_dir, paths)
    return [makes[i] for i in totals.argmax(1)], totals.max(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m builders.logo_policy", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_GLOBAL_MODEL)
    parser.add_argument("--out", type=Path, default=DEFAULT_LOGO_POLICY_FILE)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="a SavedModel version folder (default: --model's served version); for a model "
                             "trained on train + val, its train-only twin")
    args = parser.parse_args(argv)
    started = time.time()
    val = [p for p in load_split() if p.split == "val"]
    model_dir = args.model_dir or latest_version(args.model)
    answered, confidence = make_confidences(model_dir, [p.path for p in val])
    right = np.array([a == p.make for a, p in zip(answered, val)])
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, data_dir(), check_logos=False)
    fired = {row[0]: row[2] for row in json.loads(LOGO_CALIBRATION.read_text())["val"]["fired_photos"]}
    def own_brand(make: str) -> str | None:
        plugin = brand_for_make(plugins, make)
        return plugin.slug if plugin else None

    logo_fired = np.array([p.image_id in fired for p in val])
    logo_right = np.array([p.image_id in fired and fired[p.image_id] == own_brand(p.make) for p in val])

    table = []
    for t in CANDIDATES:
        above, below = confidence >= t, confidence < t
        uses_logo = below & logo_fired
        pipeline_right = np.where(uses_logo, logo_right, right)
        table.append({"below": t, "logo_share": round(float(below.mean()), 4),
                      "model_make_accuracy_above": round(float(right[above].mean()), 4) if above.any() else None,
                      "model_make_errors_below": int((~right & below).sum()),
                      "gate_firings_below": int(uses_logo.sum()),
                      "pipeline_make_accuracy": round(float(pipeline_right.mean()), 4)})
    chosen = next((row for row in table if row["model_make_accuracy_above"] is not None
                   and row["model_make_accuracy_above"] >= TARGET), table[-1])
    report = {
        "uncertain_below": chosen["below"],
        "rule": f"smallest make confidence t with the model's make right on >= {TARGET:.0%} of val photos "
                "answered at >= t: there a firing logo (right >= 99 %) cannot do better; the logo stage runs below t",
        "chosen": chosen,
        "val": {"photos": len(val), "model_make_accuracy": round(float(right.mean()), 4),
                "gate_firings": int(logo_fired.sum()), "model_make_errors": int((~right).sum())},
        "candidates": table,
        "model": str(args.model_dir) if args.model_dir else f"{args.model} v{model_dir.name}",
        "command": "python -m builders.logo_policy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.time() - started, 1),
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nuncertain_below = {chosen['below']}: logo stage on {chosen['logo_share']:.1%} of val photos, "
          f"{chosen['model_make_errors_below']} of the model's {report['val']['model_make_errors']} make errors "
          f"below it; wrote {args.out}")


if __name__ == "__main__":
    main()
