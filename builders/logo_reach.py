"""Can the logo stage fix the default model's make errors? Where the model names the wrong make,
does the SIFT matcher see the photo's true brand at all?

    python -m builders.logo_reach [--out reports/logo_reach.json] [--model-dir serving_models/efficientnet_lite0/6]

Every val and test photo goes through the real matcher (every verified candidate, not only the
best) and the served default model (its make probabilities, as the router sums them). Reported
per split:

- reach: of the photos whose make the model gets wrong, how many have a verified candidate of
  their true brand, at how many inliers, and how many have it as the best candidate. A logo can
  only fix an answer the matcher can see.
- a gate sweep: for each inlier threshold, alone and corroborated (the model gives the matched
  brand's makes at least `p` probability), photos fired, right, the 95 % lower bound, and the
  make accuracy of the `always` policy answering within the fired brand's makes, and the firings
  the `uncertain` policy would see (router_service/logo_policy.json's threshold).

The model's val figures are training data when the model was trained on train + val (v6 is);
test is the measure.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from common.plugins import DEFAULT_PLUGINS_DIR, brand_for_make, load_plugins
from logo_service.matcher import LogoMatcher
from router_service.settings import DEFAULT_GLOBAL_MODEL, DEFAULT_LOGO_POLICY_FILE
from builders.logo_calibrate import clopper_pearson_lower
from builders.logo_gallery import load_or_build
from builders.logo_policy import latest_version, make_probabilities
from dataset.split import data_dir, load_split

DEFAULT_OUT = Path("reports/logo_reach.json")
THRESHOLDS = (3, 4, 5, 6, 8, 10)
CORROBORATION = (0.0, 0.01, 0.1)  # the model's probability of the matched brand's makes, at least


def gate_row(photos: list[dict], min_inliers: int, corroboration: float, makes: list[str],
             uncertain_below: float = 1.0) -> dict:
    """One operating point: fired / right / lower bound, and the `always` policy's make accuracy;
    also how many firings the `uncertain` policy would see (make confidence below its threshold)."""
    fired = right = answered_right = fired_uncertain = 0
    for photo in photos:
        answer = makes[int(np.argmax(photo["totals"]))]
        best = photo["candidates"][0] if photo["candidates"] else None
        if best and best["inliers"] >= min_inliers and best["brand_probability"] >= corroboration:
            fired += 1
            right += best["brand"] == photo["truth"]
            fired_uncertain += bool(max(photo["totals"]) < uncertain_below)  # totals are numpy rows: a Python int
            members = [i for i, m in enumerate(makes) if m in best["makes"]]
            if members:  # the global answer restricted to the brand's makes
                answer = makes[max(members, key=lambda i: photo["totals"][i])]
        answered_right += answer == photo["make"]
    return {"min_inliers": min_inliers, "corroboration": corroboration, "fired": fired, "right": right,
            "firing_rate": round(fired / len(photos), 4),
            "precision_lower95": round(clopper_pearson_lower(right, fired), 4),
            "fired_under_uncertain_policy": fired_uncertain,
            "always_policy_make_top1": round(answered_right / len(photos), 4)}


def reach(photos: list[dict], makes: list[str], uncertain_below: float = 1.0) -> dict:
    errors = [p for p in photos if makes[int(np.argmax(p["totals"]))] != p["make"]]
    true_inliers = [max((c["inliers"] for c in p["candidates"] if c["brand"] == p["truth"]), default=0)
                    for p in errors]
    return {"photos": len(photos),
            "model_make_top1": round(1 - len(errors) / len(photos), 4),
            "model_make_errors": len(errors),
            "errors_with_true_brand_verified": sum(i > 0 for i in true_inliers),
            "errors_with_true_brand_best": sum(bool(p["candidates"]) and p["candidates"][0]["brand"] == p["truth"]
                                               for p in errors),
            "true_brand_inliers_on_errors": sorted(i for i in true_inliers if i > 0),
            "gates": [gate_row(photos, t, c, makes, uncertain_below) for t in THRESHOLDS for c in CORROBORATION]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m builders.logo_reach", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the served default model")
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    started = time.time()
    root = data_dir()
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, root)
    matcher = LogoMatcher(load_or_build(DEFAULT_PLUGINS_DIR, root, None))
    model_dir = args.model_dir or latest_version(DEFAULT_GLOBAL_MODEL)
    uncertain_below = json.loads(DEFAULT_LOGO_POLICY_FILE.read_text())["uncertain_below"]
    report = {"model": str(model_dir), "uncertain_below": uncertain_below, "command": "python -m builders.logo_reach " + " ".join(
        argv if argv is not None else sys.argv[1:])}
    for split in ("val", "test"):
        subset = [p for p in load_split(root) if p.split == split]
        makes, totals = make_probabilities(model_dir, [p.path for p in subset])
        photos = []
        for photo, row in zip(subset, totals):
            candidates = [{"brand": c.brand, "inliers": c.inliers, "makes": sorted(plugins[c.brand].makes),
                           "brand_probability": float(sum(row[i] for i, m in enumerate(makes)
                                                          if m in plugins[c.brand].makes))}
                          for c in matcher.match(photo.path.read_bytes()).candidates if c.brand in plugins]
            photos.append({"make": photo.make, "truth": brand_for_make(plugins, photo.make).slug,
                           "totals": row, "candidates": candidates})
        report[split] = reach(photos, makes, uncertain_below)
        r = report[split]
        print(f"{split}: the model gets the make wrong on {r['model_make_errors']} of {r['photos']} photos; the "
              f"matcher verifies their true brand on {r['errors_with_true_brand_verified']} "
              f"(best candidate on {r['errors_with_true_brand_best']})")
        for row in r["gates"]:
            print(f"  >= {row['min_inliers']:2d} inliers, brand probability >= {row['corroboration']:.2f}: "
                  f"fired {row['fired']:3d} ({row['firing_rate']:.1%}), right {row['right']:3d} "
                  f"(95% lower bound {row['precision_lower95']:.3f}), {row['fired_under_uncertain_policy']} "
                  f"under the uncertain policy, always-policy make top-1 "
                  f"{row['always_policy_make_top1']:.4f}")
    report["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
