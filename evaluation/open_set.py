"""The open-set verdict through the real stack, beside the naive baseline measured in the same run.

    python -m evaluation.open_set --out reports/open_set.json     # part of `make evaluate`

Photos (none of them used to fit the thresholds, see builders/open_set.py):
- catalogue: the test split as tight crops, and the same photos framed in a
  larger photo (the car covering 30-60 % of the width, on grey or on the `eval`
  half of open_set_dev's non-car photos): the verdict must not key on framing;
- open_set_dev's `eval` half: non-car photos and cars outside the catalogue.

Each goes through the router as a user sends it; the report has, at the served
thresholds, the share of each kind given each verdict, the AUROC of the scores
against the catalogue crops, the make precision of VERDICT_UNKNOWN_MODEL and
the top-1 of catalogue photos that stay recognised. The baseline is the served
default's own top probability (MSP) on the photo as sent, without localisation
or logo (`skip_localization`, `skip_logo`), thresholded to flag 3 % of the
catalogue test crops.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import grpc
import numpy as np

from builders.open_set import dev_photos, framed_catalogue
from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from dataset.split import load_split
from evaluation.framing import recognise_in_batches
from harness.stack import router_or_stack, write_report

BASELINE_FLAGGED = 0.03  # the baseline's threshold flags this share of the catalogue test crops
UNKNOWN = (pb.VERDICT_UNKNOWN_MODEL, pb.VERDICT_UNKNOWN_CAR)


def recognise(stub: pb_grpc.RecognitionServiceStub, images: list[bytes], options: pb.RecognizeOptions
              ) -> list[pb.RecognizeResponse]:
    """The responses, in order; a photo that fails stops the evaluation (every one here is readable)."""
    results = recognise_in_batches(stub, images, [str(i) for i in range(len(images))], options)
    failed = [r for r in results if r.WhichOneof("outcome") != "response"]
    if failed:
        raise RuntimeError(f"photo {failed[0].image_id} failed: {failed[0].error.message}")
    return [r.response for r in results]


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney form of the ROC area)."""
    scores = np.concatenate([negatives, positives])
    ranks = np.argsort(np.argsort(scores, kind="mergesort"), kind="mergesort").astype(float) + 1
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    positive_ranks = ranks[len(negatives):].sum()
    return float((positive_ranks - len(positives) * (len(positives) + 1) / 2) / (len(positives) * len(negatives)))


def share(answers: list[pb.RecognizeResponse], verdicts) -> float:
    return round(float(np.mean([a.verdict in verdicts for a in answers])), 4)


def unknown_score(answer: pb.RecognizeResponse) -> float:
    """The score the out-of-catalogue verdict compares: 1 - confidence on what was classified, or, for a
    photo answered not-a-car, above every car's (the detector calls it unknown first of all)."""
    return 1.0 + answer.verdict_score if answer.verdict == pb.VERDICT_NOT_A_CAR else answer.verdict_score


def evaluate(router: str, limit: int | None) -> dict:
    photos = [p for p in load_split() if p.split == "test"]
    if limit:
        photos = [photos[i] for i in sorted(np.random.default_rng(0).choice(len(photos), limit, replace=False))]
    dev = dev_photos("eval")
    sets = {"catalogue crops": [p.path.read_bytes() for p in photos],
            "catalogue framed 30-60 %": framed_catalogue(photos, "eval"),
            "not_car": [d.path.read_bytes() for d in dev if d.kind == "not_car"],
            "unknown_car": [d.path.read_bytes() for d in dev if d.kind == "unknown_car"]}
    unknown_makes = [d.make for d in dev if d.kind == "unknown_car"]
    truths = [(p.make, p.model, p.year) for p in photos]
    baseline_options = pb.RecognizeOptions(skip_localization=True, skip_logo=True)
    with grpc.insecure_channel(router, options=[("grpc.max_receive_message_length", 64 << 20),
                                                ("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        served = {name: recognise(stub, images, pb.RecognizeOptions()) for name, images in sets.items()}
        baseline = {name: recognise(stub, sets[name], baseline_options)
                    for name in ("catalogue crops", "not_car", "unknown_car")}
        policy = stub.ListModels(pb.ListModelsRequest(), timeout=30).open_set
    return report(served, baseline, truths, unknown_makes, policy, len(photos), len(dev))


def report(served: dict, baseline: dict, truths: list, unknown_makes: list[str], policy: pb.OpenSetPolicy,
           test_photos: int, dev_photos_count: int) -> dict:
    catalogue_makes = {t[0] for t in truths}
    rows = {}
    for name, answers in served.items():
        row = {"photos": len(answers), "recognized": share(answers, (pb.VERDICT_RECOGNIZED,)),
               "unknown_model": share(answers, (pb.VERDICT_UNKNOWN_MODEL,)),
               "unknown_car": share(answers, (pb.VERDICT_UNKNOWN_CAR,)),
               "not_a_car": share(answers, (pb.VERDICT_NOT_A_CAR,))}
        if name.startswith("catalogue"):
            kept = [(a, t) for a, t in zip(answers, truths) if a.verdict == pb.VERDICT_RECOGNIZED]
            row["top1_all"] = round(float(np.mean([(a.make, a.model, a.year) == t for a, t in zip(answers, truths)])), 4)
            row["top1_recognized"] = round(float(np.mean([(a.make, a.model, a.year) == t for a, t in kept])), 4)
        else:
            row["auroc_unknown_score"] = round(auroc(np.array([unknown_score(a) for a in served["catalogue crops"]]),
                                                     np.array([unknown_score(a) for a in answers])), 4)
        if name == "unknown_car":
            named = [(a, make) for a, make in zip(answers, unknown_makes) if a.verdict == pb.VERDICT_UNKNOWN_MODEL]
            row["unknown_model_make_right"] = round(float(np.mean([a.make == m for a, m in named])), 4) if named else None
            row["unknown_model_answers"] = len(named)
            row["flagged_unknown"] = share(answers, UNKNOWN)
        rows[name] = row
    msp = {name: np.array([1.0 - a.top_k[0].confidence for a in answers]) for name, answers in baseline.items()}
    threshold = float(np.quantile(msp["catalogue crops"], 1.0 - BASELINE_FLAGGED))
    base = {"threshold_1_minus_msp": round(threshold, 4)}
    for name in ("catalogue crops", "not_car", "unknown_car"):
        base[name] = {"flagged": round(float(np.mean(msp[name] > threshold)), 4)}
        if name != "catalogue crops":
            base[name]["auroc"] = round(auroc(msp["catalogue crops"], msp[name]), 4)
    known = [(a, m) for a, m in zip(baseline["unknown_car"], unknown_makes) if m in catalogue_makes]
    base["unknown_car"]["make_right_where_make_known"] = f"{sum(a.make == m for a, m in known)}/{len(known)}"
    return {"test_photos": test_photos, "dev_eval_photos": dev_photos_count,
            "policy": {"not_a_car_threshold": round(policy.not_a_car_threshold, 4),
                       "unknown_threshold": round(policy.unknown_threshold, 4),
                       "known_make_threshold": round(policy.known_make_threshold, 4), "source": policy.source},
            "served": rows, "baseline_msp": base}


def markdown(r: dict) -> str:
    s, b = r["served"], r["baseline_msp"]
    lines = [f"Open-set verdict (`python -m evaluation.open_set`): {r['test_photos']} test photos, "
             f"{r['dev_eval_photos']} open_set_dev `eval`-half photos; thresholds from {r['policy']['source']}.", "",
             "| photos | n | recognised | unknown model | unknown car | not a car | AUROC (unknown score) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in s.items():
        lines.append(f"| {name} | {row['photos']} | {row['recognized']:.3f} | {row['unknown_model']:.3f} | "
                     f"{row['unknown_car']:.3f} | {row['not_a_car']:.3f} | {row.get('auroc_unknown_score', '')} |")
    lines += ["", f"Top-1 of catalogue crops that stay recognised: {s['catalogue crops']['top1_recognized']:.3f} "
              f"(all crops: {s['catalogue crops']['top1_all']:.3f}); framed: "
              f"{s['catalogue framed 30-60 %']['top1_recognized']:.3f} ({s['catalogue framed 30-60 %']['top1_all']:.3f}).",
              f"VERDICT_UNKNOWN_MODEL names the right make on {s['unknown_car']['unknown_model_make_right']} of its "
              f"{s['unknown_car']['unknown_model_answers']} answers.", "",
              f"Baseline, the same run: MSP on the photo as sent, no localiser, no logo, flagging "
              f"{b['catalogue crops']['flagged']:.3f} of the catalogue crops: flags {b['not_car']['flagged']:.3f} of "
              f"the non-cars (AUROC {b['not_car']['auroc']:.3f}) and {b['unknown_car']['flagged']:.3f} of the unknown "
              f"cars (AUROC {b['unknown_car']['auroc']:.3f}); it names the make of "
              f"{b['unknown_car']['make_right_where_make_known']} unknown cars whose make the catalogue has."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.open_set", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--limit", type=int, help="a seeded sample of this many test photos")
    parser.add_argument("--router", help="a running router at host:port instead of starting the stack")
    args = parser.parse_args(argv)
    with router_or_stack(args.router, "carrecog-open-set-") as router:
        result = evaluate(router, args.limit)
    write_report(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
