"""Fit the open-set verdict's thresholds (router_service/open_set.json) on what the served pipeline sees.

The router answers every photo with one of the catalogue's 196 classes; the
verdict says whether to believe it (router_service/open_set.py). Its scores
come from what the pipeline already computes, so it costs no extra model:

- not a car: the localiser's ImageNet-1k car mass, over the whole photo or its
  first box, whichever is larger (router_service/open_set.py).
- out of the catalogue: 1 - the classifier's probability of its answer, on the
  crop that was classified (the catalogue's own photos are confident; cars it
  has never seen spread their probability); the probability of the ensemble
  member that never trained on val (held_out_member): val can calibrate only a
  member that did not learn it.
- which kind of unknown: the make's summed probability says whether the make
  is still known (VERDICT_UNKNOWN_MODEL) or not (VERDICT_UNKNOWN_CAR).

The thresholds are fitted here on val (the catalogue photos both as tight
crops and framed in larger photos, the car covering 30-60 % of the width, so
that a loose framing is never what says "unknown") and on the `fit` half of
../shared/data/open_set_dev (the `eval` half and the test split stay for
`python -m evaluation.open_set`). Everything runs in process on the served
SavedModels, cropping exactly as the router does (router_service.localizer).

    python -m builders.open_set            # ~6 min here; writes router_service/open_set.json
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from builders.logo_policy import latest_version
from common.model_card import read_card
from dataset.composites import background_paths, encode_jpeg, frame_around, in_half, read_bgr
from dataset.split import data_dir, load_split
from router_service.localizer import covers_photo, crop_encoded, with_margin
from router_service.open_set import not_a_car_score
from router_service.settings import (DEFAULT_CROP_MARGIN, DEFAULT_GLOBAL_MODEL, DEFAULT_LOCALIZER_MODEL,
                                     DEFAULT_OPEN_SET_FILE, DEFAULT_WHOLE_PHOTO_SHARE)
from router_service.routing import choose_answer
from router_service.tf_serving import MEMBER_CONFIDENCES, Label, Prediction, make_index

FRAMED_COVERS = (0.30, 0.60)  # the car's share of the width in the framed in-catalogue photos
SEED = 0

# What the thresholds must hold on the fitting data (issue 22's targets, with room for new sources).
IN_CATALOGUE_NOT_A_CAR = 0.002   # at most this share of catalogue photos called not-a-car
IN_CATALOGUE_UNKNOWN = 0.015     # at most this share of catalogue photos called unknown (target 2 %)
UNKNOWN_MODEL_PRECISION = 0.70   # the make named with VERDICT_UNKNOWN_MODEL is right this often


@dataclass(frozen=True)
class DevPhoto:
    image_id: str
    path: Path
    kind: str   # not_car or unknown_car
    make: str   # "" for not_car
    model: str


def dev_photos(half: str, root: Path | None = None) -> list[DevPhoto]:
    """open_set_dev's photos of one half ("fit" or "eval"), split as the localiser's composite
    backgrounds are (dataset.composites.in_half)."""
    base = (root or data_dir()) / "open_set_dev"
    with open(base / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [DevPhoto(r["image_id"], base / r["file"], r["kind"], r["make"], r["model"]) for r in rows
            if in_half(r["image_id"], half)]


def framed_catalogue(photos: list, half: str, seed: int = SEED) -> list[bytes]:
    """Each photo pasted at a random place onto grey or a real non-car photo of that half, covering a
    random 30-60 % of the width (dataset.composites)."""
    rng = np.random.default_rng([seed, 30 if half == "fit" else 31])
    backgrounds = [read_bgr(p) for p in background_paths(half)]
    framed = []
    for photo in photos:
        background = backgrounds[int(rng.integers(len(backgrounds)))] if rng.random() < 0.5 else None
        cover = float(rng.uniform(*FRAMED_COVERS))
        framed.append(encode_jpeg(frame_around(read_bgr(photo.path), cover, background, rng).image))
    return framed


class ServedPipeline:
    """The router's path without the network: the localiser, the router's crop, the global classifier."""

    def __init__(self, localizer: str = DEFAULT_LOCALIZER_MODEL, classifier: str = DEFAULT_GLOBAL_MODEL) -> None:
        self.localize = tf.saved_model.load(str(latest_version(localizer))).signatures["serving_default"]
        self.classify = tf.saved_model.load(str(latest_version(classifier))).signatures["serving_default"]
        self.score_member = held_out_member(read_card(latest_version(classifier)))

    def frame(self, images: list[bytes]) -> tuple[dict, list[bytes | None]]:
        """The localiser's outputs for a batch, and per photo the crop the router would classify (None: the
        photo as sent, when no car was found or its box with the margin covers the photo)."""
        found = self.localize(image_bytes=tf.constant(images))
        crops = []
        for i, image in enumerate(images):
            if not int(found["car_count"][i]):
                crops.append(None)
                continue
            padded = with_margin(tuple(float(v) for v in found["boxes"][i][0]), DEFAULT_CROP_MARGIN)
            crops.append(None if covers_photo(padded, DEFAULT_WHOLE_PHOTO_SHARE) else crop_encoded(image, padded))
        return found, crops

    def __call__(self, images: list[bytes], batch: int = 16) -> list[dict]:
        """Per photo: the localiser's cars_found, box_score and car_probability, and the classifier's
        answer on what the router would classify (confidence, make_confidence, make, class index)."""
        records = []
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            found, cropped_or_none = self.frame(chunk)
            crops = []
            for i, (image, crop) in enumerate(zip(chunk, cropped_or_none)):
                count = int(found["car_count"][i])
                score = float(found["scores"][i][0]) if count else 0.0
                crops.append(crop or image)
                records.append({"cars_found": count, "box_score": score,
                                "car_probability": float(found["car_probability"][i]),
                                "box_car_probability": float(found["car_probability"][i]),
                                "cropped": crop is not None})
            cropped = [i for i, record in enumerate(records[start:]) if record["cropped"]]
            if cropped:  # the router shows the localiser the crop too: its car mass on the crop alone
                seen = self.localize(image_bytes=tf.constant([crops[i] for i in cropped]))["car_probability"].numpy()
                for i, mass in zip(cropped, seen):
                    records[start + i]["box_car_probability"] = float(mass)
            out = self.classify(image_bytes=tf.constant(crops))
            if start == 0:
                labels = tuple(Label.parse(x.decode()) for x in out["labels"].numpy()[0])
                make_of_class = make_index(list(labels))
            members = out[MEMBER_CONFIDENCES].numpy() if MEMBER_CONFIDENCES in out else [None] * len(chunk)
            for record, probabilities, member in zip(records[start:], out["probabilities"].numpy(), members):
                best, make_confidence = choose_answer(Prediction(probabilities, labels, 0, "serving_default",
                                                                 make_of_class))
                confidence = float(probabilities[best])
                record.update(confidence=confidence, make=labels[best].make, make_confidence=make_confidence,
                              unknown_confidence=confidence if member is None or self.score_member is None
                              else float(member[self.score_member]))
            print(f"  {min(start + batch, len(images))}/{len(images)}", end="\r", file=sys.stderr, flush=True)
        return records


def held_out_member(card: dict) -> int | None:
    """The first ensemble member that did not train on val (its training command has no --with-val), whose
    confidence on val is as sure as on unseen photos; None for a single model or when every member saw val."""
    members = card.get("training", {}).get("members", [])
    held_out = [i for i, m in enumerate(members) if not any("--with-val" in c for c in m["commands"])]
    return held_out[0] if len(members) > 1 and held_out else None


def car_evidence(record: dict) -> float:
    """The not-a-car score's complement (router_service.open_set.not_a_car_score)."""
    return 1.0 - not_a_car_score(record["car_probability"], record["box_car_probability"])


def collect(pipeline: ServedPipeline, half: str, limit: int | None = None) -> dict[str, list[dict]]:
    """Scored records of each kind of photo: catalogue crops and framed catalogue photos (val for the
    fit half, test for the eval half), and open_set_dev's not_car and unknown_car photos of that half."""
    split = "val" if half == "fit" else "test"
    photos = [p for p in load_split() if p.split == split]
    if limit:
        photos = [photos[i] for i in sorted(np.random.default_rng(SEED).choice(len(photos), limit, replace=False))]
    sets = {"catalogue crops": ([p.path.read_bytes() for p in photos], [{"true_make": p.make} for p in photos]),
            "catalogue framed 30-60 %": (framed_catalogue(photos, half), [{"true_make": p.make} for p in photos])}
    dev = dev_photos(half)
    for kind in ("not_car", "unknown_car"):
        chosen = [d for d in dev if d.kind == kind]
        sets[kind] = ([d.path.read_bytes() for d in chosen], [{"true_make": d.make, "id": d.image_id} for d in chosen])
    scored = {}
    for name, (images, truths) in sets.items():
        started = time.monotonic()
        scored[name] = [r | t for r, t in zip(pipeline(images), truths)]
        print(f"{name}: {len(images)} photos in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return scored


def fit(scored: dict[str, list[dict]]) -> dict:
    """The thresholds, each the loosest that keeps the catalogue photos' false alarms within bounds."""
    catalogue = scored["catalogue crops"] + scored["catalogue framed 30-60 %"]
    # Not a car: halfway between the car evidence of all but IN_CATALOGUE_NOT_A_CAR of the catalogue photos and
    # that of all but 2 % of the non-car photos. The gap is wide (about 0.5 against 0.02); its middle leaves room
    # on both sides for photos unlike these.
    cars = float(np.quantile([car_evidence(r) for r in catalogue], IN_CATALOGUE_NOT_A_CAR))
    not_cars = float(np.quantile([car_evidence(r) for r in scored["not_car"]], 0.98))
    not_a_car = 1.0 - (cars + not_cars) / 2
    unknown = float(np.quantile([1.0 - r["unknown_confidence"] for r in catalogue], 1.0 - IN_CATALOGUE_UNKNOWN))
    # Of the unknown cars so flagged, the make is named (VERDICT_UNKNOWN_MODEL) above the lowest make
    # confidence at which the named make is right on UNKNOWN_MODEL_PRECISION of them.
    flagged = [r for r in scored["unknown_car"]
               if 1.0 - car_evidence(r) < not_a_car and 1.0 - r["unknown_confidence"] >= unknown]
    known_make = 1.01  # never, unless some make confidence earns it
    for candidate in sorted({r["make_confidence"] for r in flagged}):
        named = [r for r in flagged if r["make_confidence"] >= candidate]
        if len(named) >= 5 and np.mean([r["make"] == r["true_make"] for r in named]) >= UNKNOWN_MODEL_PRECISION:
            known_make = candidate
            break
    return {"not_a_car_threshold": round(not_a_car, 4), "unknown_threshold": round(unknown, 4),
            "known_make_threshold": round(known_make, 4)}


def summary(scored: dict[str, list[dict]], thresholds: dict) -> dict:
    """What the thresholds do on the fitting photos, per kind (shares of each verdict)."""
    out = {}
    for name, records in scored.items():
        verdicts = [verdict_of(r, thresholds) for r in records]
        out[name] = {v: round(verdicts.count(v) / len(verdicts), 4) for v in
                     ("recognized", "unknown_model", "unknown_car", "not_a_car")} | {"photos": len(records)}
    return out


def verdict_of(record: dict, thresholds: dict) -> str:
    """router_service.open_set.decide on a scored record (without the logo stage)."""
    if 1.0 - car_evidence(record) >= thresholds["not_a_car_threshold"]:
        return "not_a_car"
    if 1.0 - record["unknown_confidence"] < thresholds["unknown_threshold"]:
        return "recognized"
    return "unknown_model" if record["make_confidence"] >= thresholds["known_make_threshold"] else "unknown_car"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m builders.open_set", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OPEN_SET_FILE)
    parser.add_argument("--scores", type=Path, help="keep the scored records here (JSON); with --refit, read them")
    parser.add_argument("--refit", action="store_true", help="fit again on the records of --scores, scoring nothing")
    args = parser.parse_args(argv)
    if args.refit:
        scored = json.loads(args.scores.read_text())
    else:
        pipeline = ServedPipeline()
        scored = {"score_member": pipeline.score_member, **collect(pipeline, "fit")}
        if args.scores:
            args.scores.write_text(json.dumps(scored))
    score_member = scored.pop("score_member")
    thresholds = fit(scored)
    fitted = thresholds | {"score_member": score_member} | {
        "fitted_on": f"val ({len(scored['catalogue crops'])} crops, the same framed 30-60 %) and the fit half of "
                     "open_set_dev, by python -m builders.open_set",
        "bounds": {"catalogue_not_a_car": IN_CATALOGUE_NOT_A_CAR, "catalogue_unknown": IN_CATALOGUE_UNKNOWN,
                   "unknown_model_precision": UNKNOWN_MODEL_PRECISION},
        "on_the_fitting_photos": summary(scored, thresholds)}
    args.out.write_text(json.dumps(fitted, indent=1) + "\n")
    print(json.dumps(fitted, indent=1))


if __name__ == "__main__":
    main()
