"""Export the served ensemble again, its winning brand signatures answered by heads trained on the brand's photos.

    python -m training.brand_heads cache                   # once: the features (training/brand_heads.py)
    python -m training.brand_heads_export --version 12     # -> runs/brand_heads/serving/efficientnet_lite0/12

training.brand_heads measures, for every brand plugin, a logistic regression trained on the brand's
photos against the served answer (the global one restricted to the brand), and names the brands that
pass its DECISION_RULE. This exports the source version (serving_models/efficientnet_lite0/8) again with
those brands' signatures answered by their own heads: the members' softmaxes averaged, logged and tempered
(LiteServable's brand_trained). Every other signature, the trunk and serving_default are the source's,
restored from its SavedModel (training.brand_heads.rebuild): no training run is needed.

The version goes to --base, runs/brand_heads/serving by default, not serving_models: TF Serving serves a
model's highest version, so a folder there replaces the default. It is complete (card, assets, warm-up
requests) and measured from raw bytes, and every signature's top-1 must equal what training.brand_heads
computed from the cached features (the source's own figures for the unchanged ones), or nothing is written.
Moving it into serving_models is then `mv`, followed by `make evaluate` and evaluation.model_cards
(the card has no `evaluation` until then).
"""
from __future__ import annotations

import argparse
import copy
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from common.model_card import write_card
from training.brand_heads import DECISION_RULE, SERVED, measure, rebuild
from training.export import dir_bytes
from router_service.tf_serving import MEMBER_CONFIDENCES
from training.export_lite import MEMBER_CONFIDENCES_CARD, export_savedmodel
from training.export_lite import measure as measure_from_bytes
from dataset.split import load_split
from training.runinfo import machine
from training.warmup import write_warmup_requests

STAGING_BASE = Path("runs/brand_heads/serving")


def member_heads(parts, trained: dict, winners: list[str]) -> list[dict]:
    """Per member, export_savedmodel's heads: the global head, each winner's own head, and for the other
    brand signatures the global columns (LiteServable restricts the global answer for those)."""
    card = parts.card
    global_labels = [c["label"] for c in card["signatures"]["serving_default"]["classes"]]
    heads = []
    for m in range(len(parts.tops)):
        member = {"serving_default": {"kernel": parts.kernels[m], "bias": parts.biases[m], "labels": global_labels}}
        for slug in (s for s in card["signatures"] if s != "serving_default"):
            labels = [c["label"] for c in card["signatures"][slug]["classes"]]
            columns = [global_labels.index(label) for label in labels]
            if slug in winners:
                if trained[slug]["members"] != columns:
                    raise SystemExit(f"{slug}: the brand model's classes are not the signature's, in its order")
                kernel, bias = trained[slug]["heads"][m]
            else:
                kernel, bias = parts.kernels[m][:, columns], parts.biases[m][columns]
            member[slug] = {"kernel": kernel.astype("float32"), "bias": bias.astype("float32"), "labels": labels}
        heads.append(member)
    return heads


def expected_top1(card: dict, report: dict, winners: list[str]) -> dict[str, dict[str, float]]:
    """What each signature's val/test top-1 must be: the brand model's (from the cached features) for a
    winner, the source's own measured figure otherwise."""
    by_slug = {r["plugin"]: r for r in report["makes"].values() if r["plugin"]}
    return {name: {split: (by_slug[name]["ensemble"]["brand_model"][split]["top1"] if name in winners
                           else signature["metrics"]["savedmodel"][split]["top1"]) for split in ("val", "test")}
            for name, signature in card["signatures"].items()}


def new_card(card: dict, version: int, report: dict, winners: list[str], temperatures: dict, served: dict,
             heads: list[dict], export_dir: Path, argv: list[str], seconds: float) -> dict:
    card = copy.deepcopy(card)
    source_version = card["version"]
    card.pop("evaluation", None)  # the router's figures were the source's: make evaluate writes this version's
    card["version"] = version
    card["architecture"] = card["architecture"].replace(
        "the brand signatures restricted from the global answer",
        f"the brand signatures restricted from the global answer except {', '.join(winners)}: their own heads, "
        "trained on the brand's photos (training/brand_heads.py)")
    card["parameters"] += sum(member[w]["kernel"].size + member[w]["bias"].size for member in heads for w in winners)
    by_slug = {r["plugin"]: r for r in report["makes"].values() if r["plugin"]}
    card["signatures"]["serving_default"]["outputs"][MEMBER_CONFIDENCES] = MEMBER_CONFIDENCES_CARD
    for name, signature in card["signatures"].items():
        signature["metrics"]["savedmodel"] = served[name]
        if name in winners:
            brand = by_slug[name]
            signature["outputs"]["probabilities"] = (
                "DT_FLOAT [-1, C] softmax(log(the mean of the members' brand-trained heads' softmax) / T)")
            signature["brand_trained"] = {
                "head": "multinomial logistic regression per member on its pooled 1280 features, the brand's "
                        f"{brand['train_photos']} train photos only, L2 {brand['member0']['brand_model']['l2']} "
                        "(chosen on val with member 0)",
                "temperature": temperatures[name],
                "temperature_rule": "transferred: the source's T for this signature x member 0's brand-head T / "
                                    "member 0's restricted T, both fitted on val (member 1 learnt val)",
                "member0": brand["member0"], "ensemble": brand["ensemble"], "photo_gain": brand["photo_gain"]}
    card["brand_trained_signatures"] = {"signatures": winners, "decision_rule": DECISION_RULE,
                                        "report": "python -m training.brand_heads (reports/brand_heads.json)"}
    card["ensemble_temperatures"] = temperatures
    card["ensemble_temperatures_source"] += (f"; {', '.join(winners)}: transferred to the brand-trained heads "
                                             "(training.brand_heads.compare_make)")
    card["derived_from"] = f"{card['name']} version {source_version}: its trunk, members and global heads unchanged"
    card["export"] = {"command": shlex.join(["python", "-m", "training.brand_heads_export", *argv]),
                      "machine": machine(), "python": platform.python_version(),
                      "variables_bytes": dir_bytes(export_dir / "variables"), "savedmodel_bytes": dir_bytes(export_dir),
                      "seconds": round(seconds, 1)}
    return card


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=SERVED, help="the served ensemble's version folder")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", type=Path, default=STAGING_BASE, help="where <name>/<version> goes")
    p.add_argument("--force", action="store_true", help="replace an existing version folder")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    t0 = time.time()
    report, trained = measure(args.source, load_split())
    winners = report["ship"]
    if not winners:
        raise SystemExit("no brand model passes the decision rule: nothing to export")
    parts = rebuild(args.source)
    export_dir = args.base / parts.card["name"] / str(args.version)
    if export_dir.exists() and not args.force:
        raise SystemExit(f"{export_dir} exists; versions are immutable (--force replaces it)")
    staging = export_dir.parent / f".tmp-{args.version}"  # renamed at the end: never half a version
    shutil.rmtree(staging, ignore_errors=True)
    heads = member_heads(parts, trained, winners)
    temperatures = {**parts.card["ensemble_temperatures"], **{w: trained[w]["temperature"] for w in winners}}
    export_savedmodel(parts.bottom, parts.tops, heads, parts.size, staging, temperatures, parts.bridges, parts.cuts,
                      frozenset(winners))
    class_ids = {name: {"class_ids": [c["class_id"] for c in s["classes"]]}
                 for name, s in parts.card["signatures"].items()}
    served = measure_from_bytes(staging, class_ids)
    expected = expected_top1(parts.card, report, winners)
    wrong = {name: (served[name][split]["top1"], expected[name][split]) for name in served
             for split in ("val", "test") if abs(served[name][split]["top1"] - expected[name][split]) > 1e-9}
    if wrong:
        raise SystemExit(f"raw bytes disagree with the cached features (measured, expected): {wrong}; "
                         f"left in {staging}")
    card = new_card(parts.card, args.version, report, winners, temperatures, served, heads, staging, argv,
                    time.time() - t0)
    write_card(staging, card)
    write_warmup_requests(staging, card["name"], sorted(card["signatures"]))
    if args.force:
        shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    print(f"exported {export_dir}: brand-trained {winners}; every signature's top-1 from raw bytes as expected")


if __name__ == "__main__":
    main()
