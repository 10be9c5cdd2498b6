"""Export a trained Keras classifier (layers "trunk" + "head") as a TensorFlow Serving SavedModel,
with its model card: `export_model`, which the GPU import (`training.resnet_keras import`,
`training.lite_import`; `make gpu-import`) calls. The Lite ensembles reuse its signature machinery
(`training.export_lite`).

writes <base>/<name>/<version>/
    saved_model.pb, variables/   weights stored as float16, cast to float32 in-graph
    assets/labels.txt            one "<make>|<model>|<year>" label per line, tracked by the SavedModel
    assets/labels_<slug>.txt     the same for each brand signature
    model_card.json              architecture, preprocessing, classes, split hash, metrics, how it was made
    assets.extra/tf_serving_warmup_requests   one warm-up Predict per signature (training/warmup.py)

Signature "serving_default" (the router and the model server rely on it):
    inputs   image_bytes    DT_STRING [-1]       encoded JPEG / PNG bytes, one per image
    outputs  probabilities  DT_FLOAT  [-1, C]    softmax over the C classes
             labels         DT_STRING [-1, C]    the class labels, the same row repeated per image
Decoding, resizing and normalising run in-graph with `training.data.preprocess`,
the function used in training. A bad image fails the request with InvalidArgument.

The head's logits are divided by a temperature fitted on the val photos (NLL),
so a confidence of 0.8 means right about 80% of the time; the card records it.

brand_signatures=True adds one signature per brand plugin (named by its slug, e.g.
"audi") with the same contract over that brand's classes only: the softmax of
the global logits restricted to them. Seven classifiers then share one trunk on
disk and in memory; a plugin names {"name": "global", "signature": "audi"}.
"""
from __future__ import annotations

import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import tensorflow as tf

from common.model_card import write_card
from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from training import data
from training.image_guard import check_image_sizes
from training.metrics import expected_calibration_error, fit_temperature
from dataset.split import Photo, data_dir, load_split, split_hash
from training.runinfo import machine
from training.warmup import write_warmup_requests

def _float16(value: np.ndarray, name: str) -> tf.Variable:
    value = np.asarray(value).astype(np.float16)
    if not np.isfinite(value).all():
        raise ValueError(f"{name} overflows float16 (|x| > 65504)")
    return tf.Variable(value, trainable=False)


@dataclass(frozen=True)
class Head:
    """One signature: its labels and which columns of the trained head it keeps (None: all)."""
    labels: list[str]
    columns: list[int] | None = None


class SignatureModule(tf.Module):
    """A SavedModel module with one serving signature per head, each with its labels asset.

    Subclasses implement `_serve(name, image_bytes)` -> the contract's outputs.
    """

    def _add_signatures(self, labels: dict[str, list[str]], assets_dir: Path) -> None:
        self.label_assets = {}
        for name, names in labels.items():
            path = assets_dir / labels_asset_name(name)
            path.write_text("\n".join(names) + "\n")
            self.label_assets[name] = tf.saved_model.Asset(str(path))
        self.functions = {name: self._signature(name) for name in labels}

    def _signature(self, name: str):
        def serve(image_bytes):
            # refuse decompression bombs before decoding, so the real TF Serving is protected too
            with tf.control_dependencies([check_image_sizes(image_bytes)]):
                return self._serve(name, tf.identity(image_bytes))

        return tf.function(serve, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])

    def _serve(self, name: str, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        raise NotImplementedError

    def save(self, export_dir: Path) -> Path:
        signatures = {name: fn.get_concrete_function() for name, fn in self.functions.items()}
        tf.saved_model.save(self, str(export_dir), signatures=signatures)
        return Path(export_dir)


class Servable(SignatureModule):
    """float16 copies of the trunk's and head's weights + one serving function per head.

    The Keras trunk itself is held in a non-trackable namespace, so its float32
    variables are not saved; the graph calls `trunk.stateless_call` with the
    float16 variables cast to float32, then the temperature-scaled head.
    """

    def __init__(self, model: keras.Model, heads: dict[str, Head], size: int, temperature: float, assets_dir: Path):
        super().__init__(name="servable")
        trunk, head = model.get_layer("trunk"), model.get_layer("head")
        self._plain = SimpleNamespace(trunk=trunk, heads=dict(heads), size=size)  # not tracked
        self.trunk_trainable = [_float16(v.numpy(), v.path) for v in trunk.trainable_variables]
        self.trunk_non_trainable = [_float16(v.numpy(), v.path) for v in trunk.non_trainable_variables]
        self.kernel = _float16(head.kernel.numpy() / temperature, "head kernel")
        self.bias = _float16(head.bias.numpy() / temperature, "head bias")
        self._add_signatures({name: h.labels for name, h in heads.items()}, assets_dir)

    def _serve(self, name: str, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        head = self._plain.heads[name]

        def classify() -> tf.Tensor:
            images = data.preprocess_batch(image_bytes, self._plain.size)
            trainable = [tf.cast(v, tf.float32) for v in self.trunk_trainable]
            non_trainable = [tf.cast(v, tf.float32) for v in self.trunk_non_trainable]
            features, _ = self._plain.trunk.stateless_call(trainable, non_trainable, images, training=False)
            logits = features @ tf.cast(self.kernel, tf.float32) + tf.cast(self.bias, tf.float32)
            if head.columns is not None:  # restrict in logit space: no underflowed probabilities to renormalise
                logits = tf.gather(logits, head.columns, axis=1)
            return tf.nn.softmax(logits)

        return signature_outputs(image_bytes, head.labels, classify)


def labels_asset_name(signature: str) -> str:
    return "labels.txt" if signature == "serving_default" else f"labels_{signature}.txt"


def signature_outputs(image_bytes: tf.Tensor, labels: list[str], classify,
                      extra_widths: dict[str, int] | None = None) -> dict[str, tf.Tensor]:
    """The serving contract's outputs: `classify()`'s [N, C] probabilities and the labels row per image.

    With `extra_widths` ({output name: width}), `classify()` returns (probabilities, {name: [N, width]})
    and those outputs are served beside them. An empty batch answers empty [0, C] (and [0, width])
    without calling `classify` (the convolutions reject batch 0 on CPU).
    """
    n, c = tf.shape(image_bytes)[0], len(labels)
    widths = {"probabilities": c, **(extra_widths or {})}

    def computed() -> dict[str, tf.Tensor]:
        answer = classify()
        probabilities, extra = answer if extra_widths else (answer, {})
        return {"probabilities": probabilities, **extra}

    outputs = tf.cond(n > 0, computed, lambda: {name: tf.zeros([0, w], tf.float32) for name, w in widths.items()})
    label_rows = tf.ensure_shape(tf.broadcast_to(tf.constant(labels)[tf.newaxis, :], [n, c]), [None, c])
    return {name: tf.ensure_shape(outputs[name], [None, w]) for name, w in widths.items()} | {"labels": label_rows}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_savedmodel(model: keras.Model, heads: dict[str, Head], size: int, export_dir: Path,
                     temperature: float = 1.0) -> Path:
    """Write the SavedModel (one signature per head, a labels asset each) to export_dir."""
    with tempfile.TemporaryDirectory() as scratch:
        return Servable(model, heads, size, temperature, Path(scratch)).save(export_dir)


def brand_heads(classes: list[data.ClassInfo]) -> dict[str, Head]:
    """One head per brand plugin that names a model of its own and whose makes are among `classes`:
    those classes' columns. Logo-only plugins get none: the router restricts the global answer to
    their make itself (ROUTE_LOGO_RESTRICTED)."""
    heads = {}
    for slug, plugin in sorted(load_plugins(DEFAULT_PLUGINS_DIR, data_dir()).items()):
        if plugin.model is None:
            continue
        columns = [i for i, c in enumerate(classes) if c.make in plugin.makes]
        if columns:
            heads[slug] = Head([classes[i].label for i in columns], columns)
    return heads


def val_logits(model: keras.Model, photos: list[Photo], size: int) -> np.ndarray:
    """The trained head's logits (float32 Keras model) for the photos, preprocessed as in training."""
    trunk, head = model.get_layer("trunk"), model.get_layer("head")
    features = []
    for i in range(0, len(photos), 64):
        images = data.preprocess_batch(tf.constant([p.path.read_bytes() for p in photos[i : i + 64]]), size)
        features.append(trunk.predict(images, verbose=0))
    return np.concatenate(features) @ head.kernel.numpy() + head.bias.numpy()


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


def evaluate(export_dir: Path, model: keras.Model, classes: list[data.ClassInfo], heads: dict[str, Head],
             size: int, temperature: float) -> dict:
    """Val/test top-1/top-5/ECE of every signature of the exported SavedModel on its own classes'
    photos, and serving_default's largest probability difference from the float32 Keras model
    (same temperature) on 50 val photos."""
    loaded = tf.saved_model.load(str(export_dir))
    photos = load_split()
    result: dict = {}
    for name, head in heads.items():
        column_ids = [classes[i].class_id for i in (head.columns or range(len(classes)))]
        index = {cid: i for i, cid in enumerate(column_ids)}
        result[name] = {}
        for split in ("val", "test"):
            subset = [p for p in photos if p.split == split and p.class_id in index]
            probs = predict_files(loaded.signatures[name], subset)
            targets = np.array([index[p.class_id] for p in subset])
            result[name][split] = {**topk_metrics(probs, targets),
                                   "ece": expected_calibration_error(probs.max(1), probs.argmax(1) == targets)}
    known = {c.class_id for c in classes}
    sample = [p for p in photos if p.split == "val" and p.class_id in known][:50]
    served = predict_files(loaded.signatures["serving_default"], sample)
    reference = tf.nn.softmax(val_logits(model, sample, size) / temperature).numpy()
    result["float16_vs_float32"] = {
        "max_abs_prob_diff": float(np.abs(served - reference).max()),
        "top1_agreement": float(np.mean(served.argmax(1) == reference.argmax(1))),
        "n": len(sample),
    }
    return result


def export_model(model: keras.Model, classes: list[data.ClassInfo], size: int, *, model_name: str, version: int,
                 base: str | Path = "serving_models", brand_signatures: bool = False, force: bool = False,
                 architecture: str, preprocessing: dict, scope: str, trained_split_hash: str, training: dict,
                 command: str, t0: float | None = None) -> tuple[Path, dict]:
    """Export a trained Keras model (layers "trunk" + "head") as <base>/<model_name>/<version>: the
    temperature fitted on val, the SavedModel (+ one signature per brand plugin), every signature
    measured on val and test from raw bytes, and the model card (`training` goes in as given)."""
    t0 = time.time() if t0 is None else t0
    export_dir = Path(base) / model_name / str(version)
    if export_dir.exists() and not force:
        raise SystemExit(f"{export_dir} exists; versions are immutable (--force replaces it)")
    photos = load_split()
    current_hash = split_hash(photos)
    if current_hash != trained_split_hash:
        print(f"WARNING: split hash changed since training: {trained_split_hash} -> {current_hash}")
    index = {c.class_id: i for i, c in enumerate(classes)}
    val = [p for p in photos if p.split == "val" and p.class_id in index]
    temperature = fit_temperature(val_logits(model, val, size), np.array([index[p.class_id] for p in val]))
    heads = {"serving_default": Head([c.label for c in classes])}
    if brand_signatures:
        heads.update(brand_heads(classes))
    # Build the version in a hidden sibling and rename it at the end, so a model
    # server polling the base path never loads half a version.
    staging = export_dir.parent / f".tmp-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    export_savedmodel(model, heads, size, staging, temperature)
    assert (staging / "assets" / "labels.txt").read_text().splitlines() == heads["serving_default"].labels

    metrics = evaluate(staging, model, classes, heads, size, temperature)
    card = {
        "name": model_name,
        "version": version,
        "architecture": architecture,
        "parameters": int(model.count_params()),
        "input_size": [size, size, 3],
        "preprocessing": preprocessing,
        "signatures": {
            name: {
                "inputs": {"image_bytes": "DT_STRING [-1] encoded JPEG/PNG"},
                "outputs": {"probabilities": "DT_FLOAT [-1, C] softmax",
                            "labels": "DT_STRING [-1, C] '<make>|<model>|<year>'"},
                "labels_asset": labels_asset_name(name),
                "num_classes": len(head.labels),
                "scope": ("all classes of the run" if head.columns is None
                          else f"the global logits restricted to brand plugin {name!r}'s classes"),
                "metrics": metrics[name],
            }
            for name, head in heads.items()
        },
        "temperature": {"value": temperature,
                        "how": "logits / T, T minimising the val negative log-likelihood (training.metrics)"},
        "weights_dtype": "float16 (cast to float32 in-graph)",
        "num_classes": len(classes),
        "classes": [c.to_json() for c in classes],
        "scope": scope,
        "split_hash": trained_split_hash,
        "metrics": {**metrics["serving_default"], "float16_vs_float32": metrics["float16_vs_float32"]},
        "training": training,
        "export": {
            "command": command,
            "machine": machine(),
            "python": platform.python_version(),
            "seconds": None,
            "variables_bytes": dir_bytes(staging / "variables"),
            "savedmodel_bytes": dir_bytes(staging),
        },
    }
    card["export"]["seconds"] = round(time.time() - t0, 1)
    write_card(staging, card)
    write_warmup_requests(staging, model_name, sorted(heads))  # every signature: the router calls each
    if force:
        shutil.rmtree(export_dir, ignore_errors=True)
    staging.rename(export_dir)
    for name, m in metrics.items():
        if name != "float16_vs_float32":
            print(f"{name}: val top1 {m['val']['top1']:.3f} ece {m['val']['ece']:.3f} (n={m['val']['n']}) | "
                  f"test top1 {m['test']['top1']:.3f} top5 {m['test']['top5']:.3f} ece {m['test']['ece']:.3f} "
                  f"(n={m['test']['n']})")
    print(f"exported {export_dir}: {len(classes)} classes, signatures {sorted(heads)}, temperature "
          f"{temperature:.3f}, variables {card['export']['variables_bytes'] / 1e6:.1f} MB, fp16 vs fp32 max prob "
          f"diff {metrics['float16_vs_float32']['max_abs_prob_diff']:.2e}")
    return export_dir, card
