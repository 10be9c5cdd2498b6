"""Export a training run as a TensorFlow Serving SavedModel, with its model card.

    python -m training.export --run runs/global --model-name global --version 1 [--base serving_models]

writes serving_models/<name>/<version>/
    saved_model.pb, variables/   weights stored as float16, cast to float32 in-graph
    assets/labels.txt            one "<make>|<model>|<year>" label per line, tracked by the SavedModel
    model_card.json              architecture, preprocessing, classes, split hash, metrics, how it was made

Signature "serving_default" (the router and the model server rely on it):
    inputs   image_bytes    DT_STRING [-1]       encoded JPEG / PNG bytes, one per image
    outputs  probabilities  DT_FLOAT  [-1, C]    softmax over the C classes
             labels         DT_STRING [-1, C]    the class labels, the same row repeated per image
Decoding, resizing and normalising run in-graph with `training.data.preprocess`,
the function used in training. A bad image fails the request with InvalidArgument.
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
from training.split import Photo, load_split, split_hash
from training.train import load_checkpoint, machine

ARCHITECTURE = {
    "resnet50": "keras.applications.ResNet50(weights=None, include_top=False, pooling='avg') "
    "+ Dense(C, softmax); trained from random init (no pretrained weights)",
}


def _float16(variable: keras.Variable) -> tf.Variable:
    value = variable.numpy().astype(np.float16)
    if not np.isfinite(value).all():
        raise ValueError(f"{variable.path} overflows float16 (|x| > 65504)")
    return tf.Variable(value, trainable=False)


class Servable(tf.Module):
    """float16 copies of a Keras model's weights + the serving function.

    The Keras model itself is held in a non-trackable namespace, so its float32
    variables are not saved; the graph calls `model.stateless_call` with the
    float16 variables cast to float32.
    """

    def __init__(self, model: keras.Model, labels: list[str], size: int, labels_file: Path):
        super().__init__(name="servable")
        self._plain = SimpleNamespace(model=model, labels=list(labels), size=size)  # not tracked
        self.trainable_f16 = [_float16(v) for v in model.trainable_variables]
        self.non_trainable_f16 = [_float16(v) for v in model.non_trainable_variables]
        self.labels_asset = tf.saved_model.Asset(str(labels_file))
        self.serve = tf.function(
            self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")]
        )

    def _serve(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        images = data.preprocess_batch(image_bytes, self._plain.size)
        trainable = [tf.cast(v, tf.float32) for v in self.trainable_f16]
        non_trainable = [tf.cast(v, tf.float32) for v in self.non_trainable_f16]

        def classify() -> tf.Tensor:
            probabilities, _ = self._plain.model.stateless_call(trainable, non_trainable, images, training=False)
            return probabilities

        return signature_outputs(image_bytes, self._plain.labels, classify)


def signature_outputs(image_bytes: tf.Tensor, labels: list[str], classify) -> dict[str, tf.Tensor]:
    """The serving contract's outputs: `classify()`'s [N, C] probabilities and the labels row per image.

    An empty batch answers an empty [0, C] without calling `classify` (the
    convolutions reject batch 0 on CPU).
    """
    n, c = tf.shape(image_bytes)[0], len(labels)
    probabilities = tf.cond(n > 0, classify, lambda: tf.zeros([0, c], tf.float32))
    label_rows = tf.ensure_shape(tf.broadcast_to(tf.constant(labels)[tf.newaxis, :], [n, c]), [None, c])
    return {"probabilities": tf.ensure_shape(probabilities, [None, c]), "labels": label_rows}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_savedmodel(model: keras.Model, labels: list[str], size: int, export_dir: Path) -> Path:
    """Write the SavedModel (with assets/labels.txt) to export_dir."""
    with tempfile.TemporaryDirectory() as scratch:
        labels_file = Path(scratch) / "labels.txt"
        labels_file.write_text("\n".join(labels) + "\n")
        module = Servable(model, labels, size, labels_file)
        tf.saved_model.save(module, str(export_dir), signatures={"serving_default": module.serve.get_concrete_function()})
    return Path(export_dir)


def predict_files(serve, photos: list[Photo], batch: int = 64) -> np.ndarray:
    """Probabilities from a loaded signature for the photos' files (raw bytes in)."""
    out = []
    for i in range(0, len(photos), batch):
        blobs = tf.constant([p.path.read_bytes() for p in photos[i : i + batch]])
        out.append(serve(image_bytes=blobs)["probabilities"].numpy())
    return np.concatenate(out)


def topk_metrics(probs: np.ndarray, targets: np.ndarray) -> dict:
    top5 = np.argsort(-probs, axis=1)[:, :5]
    return {
        "top1": float(np.mean(top5[:, 0] == targets)),
        "top5": float(np.mean((top5 == targets[:, None]).any(axis=1))),
        "n": int(len(targets)),
    }


def evaluate(export_dir: Path, model: keras.Model, classes: list[data.ClassInfo], size: int) -> dict:
    """Val/test accuracy of the exported SavedModel itself, and its largest probability
    difference from the float32 Keras model on 50 val photos."""
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    index = {c.class_id: i for i, c in enumerate(classes)}
    photos = [p for p in load_split() if p.class_id in index]
    result: dict = {}
    for split in ("val", "test"):
        subset = [p for p in photos if p.split == split]
        probs = predict_files(serve, subset)
        result[split] = topk_metrics(probs, np.array([index[p.class_id] for p in subset]))
    sample = [p for p in photos if p.split == "val"][:50]
    served = predict_files(serve, sample)
    images = data.preprocess_batch(tf.constant([p.path.read_bytes() for p in sample]), size)
    reference = model.predict(images, verbose=0)
    result["float16_vs_float32"] = {
        "max_abs_prob_diff": float(np.abs(served - reference).max()),
        "top1_agreement": float(np.mean(served.argmax(1) == reference.argmax(1))),
        "n": len(sample),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="training run folder (ckpt.json + its epoch-<N>.keras)")
    p.add_argument("--model-name", required=True, help="TF Serving model name, e.g. global or audi")
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--base", default="serving_models", help="TF Serving model base folder")
    p.add_argument("--force", action="store_true", help="replace an existing version folder")
    args = p.parse_args(argv)

    t0 = time.time()
    model, state = load_checkpoint(Path(args.run))
    classes = [data.ClassInfo(c["class_id"], c["make"], c["model"], c["year"]) for c in state["classes"]]
    labels = [c.label for c in classes]
    size = state["preprocessing"]["size"]
    export_dir = Path(args.base) / args.model_name / str(args.version)
    if export_dir.exists() and not args.force:
        raise SystemExit(f"{export_dir} exists; versions are immutable (--force replaces it)")
    # Build the version in a hidden sibling and rename it at the end, so a model
    # server polling the base path never loads half a version.
    staging = export_dir.parent / f".tmp-{args.version}"
    shutil.rmtree(staging, ignore_errors=True)
    export_savedmodel(model, labels, size, staging)
    assert (staging / "assets" / "labels.txt").read_text().splitlines() == labels

    current_hash = split_hash(load_split())
    if current_hash != state["split_hash"]:
        print(f"WARNING: split hash changed since training: {state['split_hash']} -> {current_hash}")
    metrics = evaluate(staging, model, classes, size)
    cfg = state["config"]
    card = {
        "name": args.model_name,
        "version": args.version,
        "architecture": ARCHITECTURE[cfg["arch"]],
        "parameters": int(model.count_params()),
        "input_size": [size, size, 3],
        "preprocessing": state["preprocessing"],
        "signature": {
            "name": "serving_default",
            "inputs": {"image_bytes": "DT_STRING [-1] encoded JPEG/PNG"},
            "outputs": {"probabilities": "DT_FLOAT [-1, C] softmax", "labels": "DT_STRING [-1, C] '<make>|<model>|<year>'"},
        },
        "weights_dtype": "float16 (cast to float32 in-graph)",
        "num_classes": len(classes),
        "classes": [c.to_json() for c in classes],
        "scope": "all classes" if cfg["model"] == "global" else f"classes of brand plugin {cfg['model']!r}",
        "split_hash": state["split_hash"],
        "metrics": metrics,
        "training": {
            "command": state["command"],
            "commands": state["commands"],
            "config": cfg,
            "epochs": state["epoch"],
            "history": state["history"],
            "train_seconds": round(state["train_seconds"], 1),
            "machine": state["machine"],
        },
        "export": {
            "command": shlex.join([Path(sys.executable).name, "-m", "training.export", *(argv or sys.argv[1:])]),
            "machine": machine(),
            "python": platform.python_version(),
            "seconds": None,
            "variables_bytes": dir_bytes(staging / "variables"),
            "savedmodel_bytes": dir_bytes(staging),
        },
    }
    card["export"]["seconds"] = round(time.time() - t0, 1)
    (staging / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    if args.force:
        shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    m = metrics
    print(
        f"exported {export_dir}: {len(classes)} classes, variables {card['export']['variables_bytes'] / 1e6:.1f} MB | "
        f"val top1 {m['val']['top1']:.3f} top5 {m['val']['top5']:.3f} (n={m['val']['n']}) | "
        f"test top1 {m['test']['top1']:.3f} top5 {m['test']['top5']:.3f} (n={m['test']['n']}) | "
        f"fp16 vs fp32 max prob diff {m['float16_vs_float32']['max_abs_prob_diff']:.2e}"
    )


if __name__ == "__main__":
    main()
