"""Whole photos, not crops: the pipeline on photos framed around their car, with and without localisation.

    python -m evaluation.framing --out reports/framing.json                 # the test split, the table below
    python -m evaluation.framing --split val --limit 200 --out reports/framing-val.json

Every photo of the split (tight crops of cars) is placed, centred, in a 4:3
frame where the car covers 85 %, 70 % or 50 % of the width, on plain grey or on
a real non-car photograph (the `eval` half of ../shared/data/open_set_dev's
not_car photos; the localiser was fitted on the other half). Each framed photo
goes through the real stack twice: as a user sends it (the router localises,
crops and classifies) and with `skip_localization` (the photo classified whole:
the service before the localiser). The report has top-1, make top-1 and ECE
for each framing and both ways, the IoU of the answered box with the pasted
one, and two-car composites (the larger car answered, the count 2).
Fixed seed: the same frames every run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import numpy as np

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from dataset.split import load_split
from harness.stack import router_or_stack, write_report
from dataset.composites import background_paths, encode_jpeg, frame_around, iou, read_bgr, two_cars
from training.metrics import expected_calibration_error

COVERS = (0.85, 0.70, 0.50)
BATCH = 16
SEED = 0


def framed_sets(photos: list, backgrounds: list[np.ndarray], seed: int = SEED) -> dict[str, list[dict]]:
    """{condition: [{"image", "box", "label", "make"}]}: the tight crops, then each cover on grey and on a photo."""
    sets: dict[str, list[dict]] = {"tight crop": []}
    for photo in photos:
        sets["tight crop"].append(_item(photo, photo.path.read_bytes(), np.array([0, 0, 1, 1], np.float32)))
    for background in ("grey", "real photo"):
        for cover in COVERS:
            rng = np.random.default_rng([seed, int(cover * 100), background == "grey"])
            name = f"{background}, car on {cover:.0%} of the width"
            sets[name] = []
            for photo in photos:
                bg = backgrounds[int(rng.integers(len(backgrounds)))] if background == "real photo" else None
                framed = frame_around(read_bgr(photo.path), cover, bg, rng, aspect=4 / 3, centred=True)
                sets[name].append(_item(photo, encode_jpeg(framed.image), framed.boxes[0]))
    return sets


def two_car_set(photos: list, backgrounds: list[np.ndarray], seed: int = SEED) -> list[dict]:
    """The photo's car at 45 % of the width beside another car at 60 % of its size, on a real photo."""
    rng = np.random.default_rng([seed, 2])
    items = []
    for photo in photos:
        other = photos[int(rng.integers(len(photos)))]
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        c = two_cars(read_bgr(photo.path), read_bgr(other.path), 0.45, 0.6, bg, rng)
        items.append(_item(photo, encode_jpeg(c.image), c.boxes[0]))
    return items


def _item(photo, image: bytes, box: np.ndarray) -> dict:
    return {"image": image, "box": box, "truth": (photo.make, photo.model, int(photo.year)), "make": photo.make,
            "id": photo.image_id}


def recognise_in_batches(stub: pb_grpc.RecognitionServiceStub, images: list[bytes], ids: list[str],
                         options: pb.RecognizeOptions) -> list[pb.RecognizeResult]:
    """Every image through RecognizeBatch, BATCH at a time, with the same options; results in order."""
    results = []
    for start in range(0, len(images), BATCH):
        requests = [pb.RecognizeRequest(image=image, image_id=image_id, options=options)
                    for image, image_id in zip(images[start:start + BATCH], ids[start:start + BATCH])]
        results.extend(stub.RecognizeBatch(pb.RecognizeBatchRequest(requests=requests), timeout=600).results)
    return results


def recognise(stub: pb_grpc.RecognitionServiceStub, items: list[dict], skip: bool) -> list[pb.RecognizeResult]:
    return recognise_in_batches(stub, [i["image"] for i in items], [i["id"] for i in items],
                                pb.RecognizeOptions(skip_localization=skip))


def score(items: list[dict], results: list[pb.RecognizeResult]) -> dict:
    answered = [(i, r.response) for i, r in zip(items, results) if r.WhichOneof("outcome") == "response"]
    right = np.array([(a.make, a.model, a.year) == i["truth"] for i, a in answered])
    confidence = np.array([a.confidence for _, a in answered])
    box = lambda a: np.array([a.box.x_min, a.box.y_min, a.box.x_max, a.box.y_max])  # noqa: E731
    ious = np.array([iou(box(a), i["box"]) for i, a in answered])
    framings = {}
    for _, a in answered:
        name = pb.Framing.Name(a.framing).removeprefix("FRAMING_").lower()
        framings[name] = framings.get(name, 0) + 1
    return {"photos": len(items), "errors": len(items) - len(answered),
            "top1": round(float(right.mean()), 4),
            "make_top1": round(float(np.mean([a.make == i["make"] for i, a in answered])), 4),
            "ece": round(float(expected_calibration_error(confidence, right)), 4),
            "box_iou_median": round(float(np.median(ious)), 3),
            "box_iou_at_least_0.8": round(float(np.mean(ious >= 0.8)), 3),
            "cars_found": {str(k): int(v) for k, v in zip(*np.unique([a.cars_found for _, a in answered],
                                                                        return_counts=True))},
            "framing": framings,
            "p50_total_ms": round(float(np.median([next(t.ms for t in a.timings if t.stage == "total")
                                                   for _, a in answered])), 1)}


def evaluate(router: str, split: str, limit: int | None) -> dict:
    photos = [p for p in load_split() if p.split == split]
    if limit:
        photos = [photos[i] for i in np.random.default_rng(SEED).choice(len(photos), limit, replace=False)]
    backgrounds = [read_bgr(p) for p in background_paths("eval")]
    sets = framed_sets(photos, backgrounds)
    sets["two cars, the photo's car the larger"] = two_car_set(photos, backgrounds)
    report = {"split": split, "photos": len(photos), "seed": SEED, "conditions": {}}
    with grpc.insecure_channel(router, options=[("grpc.max_receive_message_length", 64 << 20),
                                                ("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        for name, items in sets.items():
            row = {"localised": score(items, recognise(stub, items, skip=False)),
                   "whole photo": score(items, recognise(stub, items, skip=True))}
            report["conditions"][name] = row
            print(f"{name:45s} localised top-1 {row['localised']['top1']:.3f} make {row['localised']['make_top1']:.3f}"
                  f" IoU>=0.8 {row['localised']['box_iou_at_least_0.8']:.2f} | whole photo top-1 "
                  f"{row['whole photo']['top1']:.3f} make {row['whole photo']['make_top1']:.3f}", flush=True)
    return report


def markdown(report: dict) -> str:
    lines = [f"Framing, {report['split']} split, {report['photos']} photos, seed {report['seed']} "
             "(`python -m evaluation.framing`):", "",
             "| the car | localised: top-1 / make / ECE | box IoU >= 0.8 | whole photo (before): top-1 / make / ECE |",
             "| --- | --- | --- | --- |"]
    for name, row in report["conditions"].items():
        a, b = row["localised"], row["whole photo"]
        lines.append(f"| {name} | {a['top1']:.3f} / {a['make_top1']:.3f} / {a['ece']:.3f} | "
                     f"{a['box_iou_at_least_0.8']:.2f} | {b['top1']:.3f} / {b['make_top1']:.3f} / {b['ece']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.framing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--limit", type=int, help="a random sample of this many photos (seeded)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--router", help="a running router at host:port instead of starting the stack")
    parser.add_argument("--router-arg", action="append", default=[], help="extra router flag (repeatable)")
    args = parser.parse_args(argv)
    with router_or_stack(args.router, "carrecog-framing-", args.router_arg) as router:
        report = evaluate(router, args.split, args.limit)
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
