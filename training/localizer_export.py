"""Export the localiser as a SavedModel that TensorFlow Serving (and the stand-in) serve.

    python -m training.localizer export --run runs/localizer --version 1

writes serving_models/localizer/<version>/ with one signature, `serving_default`:

    inputs   image_bytes      string [N]          encoded photos (JPEG, PNG, GIF, BMP)
    outputs  boxes            float  [N, 5, 4]    x_min, y_min, x_max, y_max in [0, 1], the cars found,
                                                  largest first; zero rows after the last car
             scores           float  [N, 5]       each box's score (0 for the zero rows)
             car_count        int32  [N]          how many boxes scored at or above the threshold
             car_probability  float  [N]          the ImageNet head's probability mass on its car classes

The box decoding (score = on-a-car x centredness, greedy NMS at IoU 0.5 over the
cells at or above the fitted threshold, each kept box fused with the cells that
overlap it by IoU > 0.6, weighted by score) is the same arithmetic as
`training.localizer.decode_cells`; `export` checks that the graph and the NumPy
version agree on the val composites before it writes the version.
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common.model_card import write_card
from training import data
from training.export import dir_bytes
from training.image_guard import check_image_sizes
from training.localizer import (CAR_CLASSES, GRID, MAX_BOXES, SIZE, VARIANT, Trunk, build_head, cell_centres,
                                choose, decode_cells, inputs_of)
from training.runinfo import machine
from training.warmup import write_warmup_requests

MODEL_NAME = "localizer"
NMS_IOU, FUSE_IOU = 0.5, 0.6


class LocalizerModule(tf.Module):
    def __init__(self, trunk: Trunk, head: keras.Model, threshold: float) -> None:
        super().__init__(name="localizer")
        self.trunk, self.head = trunk.model, head
        self.imagenet_kernel = tf.Variable(trunk.kernel, trainable=False)
        self.imagenet_bias = tf.Variable(trunk.bias, trainable=False)
        self.threshold = tf.Variable(threshold, trainable=False, dtype=tf.float32)
        self.centres = tf.constant(cell_centres().reshape(1, GRID * GRID, 2))
        self.serve = tf.function(self._serve, input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])

    def _serve(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        with tf.control_dependencies([check_image_sizes(image_bytes)]):  # no decompression bombs
            pixels = data.preprocess_batch(tf.identity(image_bytes), SIZE)
        fine, coarse = self.trunk(pixels, training=False)
        logits = tf.reduce_mean(coarse, axis=[1, 2]) @ self.imagenet_kernel + self.imagenet_bias
        car_probability = tf.reduce_sum(tf.nn.softmax(logits) * self._car_mask(), axis=1)
        cells = tf.reshape(self.head([fine, coarse], training=False), [-1, GRID * GRID, 6])
        score = tf.sigmoid(cells[..., 0]) * tf.sigmoid(cells[..., 1])
        d = cells[..., 2:]
        c = self.centres
        boxes = tf.clip_by_value(tf.stack([c[..., 0] - d[..., 0], c[..., 1] - d[..., 1],
                                           c[..., 0] + d[..., 2], c[..., 1] + d[..., 3]], -1), 0.0, 1.0)
        found_boxes, found_scores, count = tf.map_fn(
            self._one_photo, (boxes, score),
            fn_output_signature=(tf.TensorSpec([MAX_BOXES, 4], tf.float32), tf.TensorSpec([MAX_BOXES], tf.float32),
                                 tf.TensorSpec([], tf.int32)))
        return {"boxes": found_boxes, "scores": found_scores, "car_count": count,
                "car_probability": car_probability}

    def _car_mask(self) -> tf.Tensor:
        mask = np.zeros([1000], np.float32)
        mask[sorted(CAR_CLASSES)] = 1.0
        return tf.constant(mask)

    def _one_photo(self, args: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        boxes, score = args  # [G*G, 4], [G*G]
        keep = tf.image.non_max_suppression(boxes, score, MAX_BOXES, iou_threshold=NMS_IOU,
                                            score_threshold=self.threshold)
        kept = tf.gather(boxes, keep)
        overlap = tf.cast(pairwise_iou(kept, boxes) > FUSE_IOU, tf.float32) * score[None, :]
        fused = (overlap @ boxes) / tf.reduce_sum(overlap, axis=1, keepdims=True)
        kept_scores = tf.gather(score, keep)
        area = (fused[:, 2] - fused[:, 0]) * (fused[:, 3] - fused[:, 1])
        order = tf.argsort(area, direction="DESCENDING")  # the most prominent car first
        fused, kept_scores = tf.gather(fused, order), tf.gather(kept_scores, order)
        count = tf.shape(keep)[0]
        pad = MAX_BOXES - count
        return (tf.pad(fused, [[0, pad], [0, 0]]), tf.pad(kept_scores, [[0, pad]]), count)


def pairwise_iou(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """[K, 4] x [M, 4] -> [K, M] IoU of boxes x_min, y_min, x_max, y_max."""
    a, b = a[:, None, :], b[None, :, :]
    w = tf.maximum(0.0, tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]))
    h = tf.maximum(0.0, tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]))
    inter = w * h
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return tf.where(union > 0, inter / tf.maximum(union, 1e-12), 0.0)


def check_against_numpy(module: LocalizerModule, head: keras.Model, run: Path, threshold: float) -> dict:
    """The graph's boxes against decode_cells + choose on the cached val feature maps: the same count and
    the same answered (largest) box, to 1e-3."""
    maps = [x[:200] for x in inputs_of(np.load(run / "val.npz"))]
    expected = decode_cells(head.predict(maps, verbose=0), FUSE_IOU, NMS_IOU)
    # run the graph's box part on the cached maps (the decode of JPEGs is the trunk's business)
    cells = tf.reshape(head(maps, training=False), [-1, GRID * GRID, 6])
    score = tf.sigmoid(cells[..., 0]) * tf.sigmoid(cells[..., 1])
    d, c = cells[..., 2:], module.centres
    boxes = tf.clip_by_value(tf.stack([c[..., 0] - d[..., 0], c[..., 1] - d[..., 1],
                                       c[..., 0] + d[..., 2], c[..., 1] + d[..., 3]], -1), 0.0, 1.0)
    mismatches = 0
    for n in range(len(maps[0])):
        got_boxes, _, got_count = (t.numpy() for t in module._one_photo((boxes[n], score[n])))
        count, index = choose(expected[n], threshold)
        if count != got_count or (count and np.abs(expected[n][index][1] - got_boxes[0]).max() > 1e-3):
            mismatches += 1
    if mismatches > 2:  # float32 ties in NMS order may flip a borderline box or two
        raise RuntimeError(f"the exported graph disagrees with decode_cells on {mismatches} of {len(maps[0])} photos")
    return {"photos": len(maps[0]), "mismatches": mismatches}


def export(run: Path, version: int, base: Path, command: str) -> Path:
    started = time.time()
    fit = json.loads((run / "fit.json").read_text())
    features = json.loads((run / "features.json").read_text())
    trunk = Trunk()
    head = build_head()
    head.load_weights(run / "box_head.weights.h5")
    module = LocalizerModule(trunk, head, float(fit["threshold"]))
    agreement = check_against_numpy(module, head, run, float(fit["threshold"]))
    export_dir = base / MODEL_NAME / str(version)
    if export_dir.exists():
        raise FileExistsError(f"{export_dir} exists; pick a new --version")
    with tempfile.TemporaryDirectory(dir=base) as scratch:
        staging = Path(scratch) / "staging"
        tf.saved_model.save(module, str(staging), signatures={"serving_default": module.serve.get_concrete_function()})
        card = {
            "name": MODEL_NAME,
            "version": version,
            "architecture": (f"EfficientNet-{VARIANT.capitalize()} ImageNet trunk, frozen as in the PyPI wheel, "
                             f"at {SIZE} px; an FCOS-style box head on its {GRID}x{GRID} stride-16 map (with the "
                             f"stride-32 map for context), trained on composites; "
                             "the untouched ImageNet-1k head for the car probability"),
            "input_size": [SIZE, SIZE],
            "task": "localisation: boxes of the cars in a photo, largest first, and whether it shows a car at all",
            "outputs": {"boxes": "[N, 5, 4] x_min, y_min, x_max, y_max in [0, 1], largest first, zero-padded",
                        "scores": "[N, 5]", "car_count": "[N] boxes scoring >= threshold",
                        "car_probability": "[N] ImageNet probability mass on the car classes"},
            "threshold": fit["threshold"],
            "car_classes": {str(k): v for k, v in sorted(CAR_CLASSES.items())},
            "decoding": {"nms_iou": NMS_IOU, "fuse_iou": FUSE_IOU, "max_boxes": MAX_BOXES,
                         "graph_vs_numpy": agreement},
            "trained_on": ("composites of train-split crops pasted at known boxes (dataset/composites.py): "
                           f"{features['composites']}, backgrounds: {features['backgrounds']}, seed {features['seed']}"),
            "split_hash": features["split_hash"],
            "val_composites": fit,
            "export": {"command": command, "machine": machine(), "python": platform.python_version(),
                       "seconds": round(time.time() - started, 1)},
        }
        card["export"]["savedmodel_bytes"] = dir_bytes(staging)
        write_card(staging, card)
        write_warmup_requests(staging, MODEL_NAME, ["serving_default"])
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(export_dir)
    print(f"exported {export_dir}: {card['export']['savedmodel_bytes'] / 1e6:.1f} MB, threshold {fit['threshold']}")
    return export_dir
