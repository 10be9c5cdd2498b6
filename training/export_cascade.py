"""Export an EfficientNet-Lite ensemble as a cascade: the second member runs only where the first is unsure.

    python -m training.export_cascade --source serving_models/efficientnet_lite0/12 --version 13

An ensemble (training.export_lite) runs every member on every photo. Most photos
do not need the second opinion: when the first member's top probability is at
least a threshold, the cascade answers with the first member's (calibrated)
probabilities; below it, the photo also goes through the second member and is
answered exactly as the ensemble answers (softmax(log(mean) / T)). The second
member runs on the unsure rows of the batch only (tf.gather / scatter in-graph),
so a batch costs the shared bottom, the first member and a fraction of the
second. serving_default also returns `member_confidences` as the ensemble does
(the open-set verdict reads the first member's), with -1 for a member a row did
not need.

The threshold is the LOWEST at which the cascade's top-1 equals the ensemble's
on at least --agreement (99 %) of the val photos, so it skips as much as that
allows. The first member must be one trained on train only (val is honest for it);
v8's second member learnt val, so the ensemble's val answers lean on it and the
val agreement is, if anything, pessimistic. Brand signatures answer exactly as the
source's, from every member (brand-trained heads included): they run only when a
logo matched or a caller forced them.

The weights come from the source SavedModel itself (training.lite_savedmodel), so
no training run is needed. Writes <base>/<name>/<version> with a model card:
the source's card, the cascade's threshold, val and test agreement with the
source, its own metrics from raw bytes, and the share of photos that needed the
second member.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from common.model_card import read_card, write_card
from training import data
from training.export import dir_bytes, predict_files, signature_outputs, topk_metrics
from router_service.tf_serving import MEMBER_CONFIDENCES
from training.export_lite import LiteServable, photos_of
from training.lite_savedmodel import Ensemble, load_ensemble
from training.metrics import expected_calibration_error
from dataset.split import load_split
from training.runinfo import machine
from training.warmup import write_warmup_requests


NOT_RUN = -1.0  # member_confidences of a member the cascade did not run on that row


class CascadeServable(LiteServable):
    """LiteServable's parts and signatures. serving_default runs the other members on the unsure rows only;
    the brand signatures answer exactly as the source ensemble's (every member, brand-trained heads kept)."""

    def __init__(self, ensemble: Ensemble, first: int, threshold: float, assets_dir: Path):
        order = [first] + [i for i in range(len(ensemble.tops)) if i != first]
        heads = []
        for i in order:
            member = {name: {"labels": labels} for name, labels in ensemble.labels.items()}
            member["serving_default"] |= {"kernel": ensemble.kernels[i], "bias": ensemble.biases[i]}
            for name, (kernels, biases) in ensemble.own_heads.items():
                member[name] |= {"kernel": kernels[i], "bias": biases[i]}
            heads.append(member)
        super().__init__(ensemble.bottom, [ensemble.tops[i] for i in order], heads, ensemble.size, assets_dir,
                         ensemble.temperatures, ensemble.bridges, [ensemble.cuts[i] for i in order],
                         frozenset(ensemble.own_heads))
        self.threshold = tf.Variable(threshold, trainable=False, dtype=tf.float32, name="cascade_threshold")

    def _member(self, i: int, activations: tf.Tensor) -> tf.Tensor:
        entry = self._plain.entries[i]
        x = self.bridges[entry](activations, training=False) if entry else activations
        head = self.kernels[i]["serving_default"], self.biases[i]["serving_default"]
        return tf.nn.softmax(self.tops[i](x, training=False) @ head[0] + head[1])

    def _serve(self, name: str, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        if name != "serving_default":  # rare (a matched logo, force_model): the whole ensemble, as the source
            return super()._serve(name, image_bytes)
        temperature, others = self.temperatures[name], len(self.tops) - 1

        def classify() -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
            shared = self.bottom(data.preprocess_batch(image_bytes, self._plain.size), training=False)
            first = self._member(0, shared)
            first_top = tf.reduce_max(first, axis=1)
            unsure = tf.where(first_top < self.threshold)[:, 0]
            c = first.shape[1]

            def second_opinion() -> tuple[tf.Tensor, tf.Tensor]:
                # pad the unsure rows to a power of two (repeating the first), so the other members see at
                # most 6 batch sizes up to 32: each new shape costs oneDNN a slow first call
                n = tf.size(unsure)
                bucket = tf.cast(tf.math.pow(2.0, tf.math.ceil(tf.math.log(tf.cast(n, tf.float32)) / np.log(2.0))),
                                 tf.int32)
                padded = tf.concat([unsure, tf.fill([bucket - n], unsure[0])], axis=0)
                rest = tf.gather(shared, padded)
                members = [self._member(i, rest)[:n] for i in range(1, len(self.tops))]
                mean = tf.add_n([tf.gather(first, unsure)] + members) / len(self.tops)
                return mean, tf.stack([tf.reduce_max(m, axis=1) for m in members], axis=1)

            mean, other_tops = tf.cond(tf.size(unsure) > 0, second_opinion,
                                       lambda: (tf.zeros([0, c], tf.float32), tf.zeros([0, others], tf.float32)))
            tempered = tf.nn.softmax(tf.math.log(tf.maximum(mean, 1e-30)) / temperature)
            answer = tf.tensor_scatter_nd_update(first, unsure[:, tf.newaxis], tempered)
            # each member's top probability; NOT_RUN for a member the row did not need
            not_run = tf.fill([tf.shape(first)[0], others], NOT_RUN)
            confidences = tf.concat([first_top[:, tf.newaxis],
                                     tf.tensor_scatter_nd_update(not_run, unsure[:, tf.newaxis], other_tops)], axis=1)
            return answer, {MEMBER_CONFIDENCES: confidences}

        return signature_outputs(image_bytes, self._plain.labels[name], classify, {MEMBER_CONFIDENCES: len(self.tops)})


def member_outputs(ensemble: Ensemble, photos: list, batch: int = 32) -> tuple[list[np.ndarray], np.ndarray]:
    """Each member's probabilities and the ensemble's serving_default answer, for the photos' bytes."""
    members, answers = [], []
    for i in range(0, len(photos), batch):
        images = data.preprocess_batch(tf.constant([p.path.read_bytes() for p in photos[i: i + batch]]),
                                       ensemble.size)
        probs = ensemble.member_probabilities(images)
        members.append([p.numpy() for p in probs])
        mean = tf.add_n(probs) / len(probs)
        answers.append(tf.nn.softmax(tf.math.log(tf.maximum(mean, 1e-30)) /
                                     ensemble.temperatures["serving_default"]).numpy())
    return [np.concatenate([m[j] for m in members]) for j in range(len(ensemble.tops))], np.concatenate(answers)


def cascade_answers(first: np.ndarray, ensemble: np.ndarray, threshold: float) -> np.ndarray:
    return np.where((first.max(1) >= threshold)[:, None], first, ensemble)


def choose_threshold(first: np.ndarray, ensemble: np.ndarray, agreement: float) -> float:
    """The lowest threshold at which argmax(cascade) == argmax(ensemble) on >= `agreement` of the rows."""
    for threshold in np.unique(np.concatenate([first.max(1), [1.0 + 1e-6]])):
        if np.mean(cascade_answers(first, ensemble, threshold).argmax(1) == ensemble.argmax(1)) >= agreement:
            return float(threshold)
    return 1.0 + 1e-6  # never confident: always the full ensemble


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, required=True, help="an exported ensemble's version folder")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", default="serving_models")
    p.add_argument("--first", type=int, default=0, help="the member that answers alone when it is sure (train-only)")
    p.add_argument("--agreement", type=float, default=0.99, help="val top-1 agreement with the ensemble to keep")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)

    t0 = time.time()
    source_card = read_card(args.source)
    name = source_card["name"]
    export_dir = Path(args.base) / name / str(args.version)
    if export_dir.exists() and not args.force:
        raise SystemExit(f"{export_dir} exists; versions are immutable (--force replaces it)")
    ensemble = load_ensemble(args.source)
    photos = [ph for ph in load_split() if ph.split in ("val", "test")]
    cache = Path("runs") / "cascade" / f"{name}-{args.source.name}-members.npz"  # runs/ is ignored by git
    if cache.exists() and list(np.load(cache)["image_ids"]) == [ph.image_id for ph in photos]:
        with np.load(cache) as z:
            members, answers = [z[f"member{i}"] for i in range(len(ensemble.tops))], z["answers"]
    else:
        members, answers = member_outputs(ensemble, photos)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, answers=answers, image_ids=np.array([ph.image_id for ph in photos]),
                 **{f"member{i}": m for i, m in enumerate(members)})
    first = members[args.first]
    is_val = np.array([ph.split == "val" for ph in photos])
    threshold = choose_threshold(first[is_val], answers[is_val], args.agreement)
    cascade = cascade_answers(first, answers, threshold)
    stats = {split: {"agreement_with_source": float(np.mean(cascade[m].argmax(1) == answers[m].argmax(1))),
                     "second_member_share": float(np.mean(first[m].max(1) < threshold)), "n": int(m.sum())}
             for split, m in (("val", is_val), ("test", ~is_val))}
    print(f"threshold {threshold:.4f}: {json.dumps(stats)}", flush=True)

    staging = export_dir.parent / f".tmp-{args.version}"
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory() as scratch:
        CascadeServable(ensemble, args.first, threshold, Path(scratch)).save(staging)
    loaded = tf.saved_model.load(str(staging))
    metrics = {}
    for signature, sig in source_card["signatures"].items():
        class_ids = [c["class_id"] for c in sig["classes"]]
        metrics[signature] = {}
        for split in ("val", "test"):
            subset, y = photos_of(split, class_ids)
            probs = predict_files(loaded.signatures[signature], subset)
            metrics[signature][split] = {**topk_metrics(probs, y),
                                         "ece": expected_calibration_error(probs.max(1), probs.argmax(1) == y)}
        print(f"{signature}: val {metrics[signature]['val']['top1']:.3f} test {metrics[signature]['test']['top1']:.3f}"
              f" ece {metrics[signature]['test']['ece']:.3f}", flush=True)
    served = predict_files(loaded.signatures["serving_default"], [ph for ph in photos if ph.split == "test"])
    stats["test"]["served_agreement_with_source"] = float(np.mean(served.argmax(1) == answers[~is_val].argmax(1)))
    stats["test"]["served_max_abs_prob_diff_from_offline_cascade"] = float(np.abs(served - cascade[~is_val]).max())

    card = json.loads(json.dumps(source_card))
    card.update(version=args.version, architecture=(
        f"A cascade of {args.source}'s ensemble: " + source_card["architecture"] +
        f". Member {args.first} answers alone when its top probability is >= the threshold; the other rows of "
        "the batch also run the other member and are answered as the ensemble answers"))
    for signature, sig in card["signatures"].items():
        sig["metrics"]["savedmodel"] = metrics[signature]
    card["signatures"]["serving_default"]["outputs"][MEMBER_CONFIDENCES] = (
        f"DT_FLOAT [-1, M] each member's top calibrated probability, member {args.first} first; {NOT_RUN:g} for a "
        "member the cascade did not run on that row")
    card["cascade"] = {"source": str(args.source), "first_member": args.first, "threshold": threshold,
                       "how": f"the lowest threshold with top-1 agreement >= {args.agreement} with the source "
                              "ensemble on val (training.export_cascade)", **stats}
    card["export"] = {"command": shlex.join(["python", "-m", "training.export_cascade", *(argv or sys.argv[1:])]),
                      "machine": machine(), "variables_bytes": dir_bytes(staging / "variables"),
                      "savedmodel_bytes": dir_bytes(staging), "seconds": round(time.time() - t0, 1)}
    card.pop("evaluation", None)  # the router's figures are the source's: re-measure with make evaluate
    write_card(staging, card)
    write_warmup_requests(staging, name, sorted(card["signatures"]))
    if args.force:
        shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    print(f"exported {export_dir} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
