"""Rebuild an exported EfficientNet-Lite ensemble (training.export_lite) from its SavedModel alone.

    python -m training.lite_savedmodel serving_models/efficientnet_lite0/8     # rebuild + check on val photos

The runs an ensemble was exported from (runs/..., never committed) are not on
every machine, but the SavedModel holds every weight: its variables checkpoint
keeps the Keras parts under the names LiteServable tracked them by ("bottom",
"tops/<i>", "bridges/cut<c>", "kernels/<i>/<signature>", ...). Building the same
parts with training.efficientnet_lite (variant, size and cuts from the model
card) and reading that checkpoint into them gives back the trained network,
ready to be re-exported in another form (training.export_cascade). `check`
verifies the rebuilt parts answer exactly as the served signature does.
"""
from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common.model_card import read_card
from training import data
from training.efficientnet_lite import build_parts, build_span


@dataclass
class Ensemble:
    variant: str
    size: int
    cuts: list[int]                  # each member's first fine-tuned block
    bottom: keras.Model              # ImageNet blocks below the lowest cut
    bridges: dict[int, keras.Model]  # cut -> the ImageNet blocks from the lowest cut to it
    tops: list[keras.Model]          # per member: its blocks, head conv, pooling -> [N, 1280]
    kernels: list[np.ndarray]        # per member: the global head [1280, C] (calibrated)
    biases: list[np.ndarray]
    own_heads: dict[str, tuple[list[np.ndarray], list[np.ndarray]]]  # brand signature -> its members' own heads
    temperatures: dict[str, float]   # per signature
    labels: dict[str, list[str]]     # per signature

    def member_probabilities(self, images: tf.Tensor) -> list[tf.Tensor]:
        """Each member's calibrated global probabilities [N, C] for preprocessed images."""
        shared = self.bottom(images, training=False)
        bridged = {c: bridge(shared, training=False) for c, bridge in self.bridges.items()}
        return [tf.nn.softmax(top(bridged.get(cut, shared), training=False) @ k + b)
                for top, cut, k, b in zip(self.tops, self.cuts, self.kernels, self.biases)]

    def probabilities(self, images: tf.Tensor) -> tf.Tensor:
        """serving_default's answer: softmax(log(the members' mean) / T)."""
        mean = tf.add_n(self.member_probabilities(images)) / len(self.tops)
        return tf.nn.softmax(tf.math.log(tf.maximum(mean, 1e-30)) / self.temperatures["serving_default"])


def member_cuts(card: dict) -> tuple[str, list[int]]:
    """(variant, each member's first fine-tuned block) from the card's feature-cache commands
    (`training.lite_features --variant lite0 --cut 6 ...`)."""
    found = []
    for member in card["training"]["members"]:
        words = shlex.split(member["commands"][0])
        found.append((words[words.index("--variant") + 1], int(words[words.index("--cut") + 1])))
    return found[0][0], [cut for _, cut in found]


def load_ensemble(export_dir: Path) -> Ensemble:
    export_dir = Path(export_dir)
    card = read_card(export_dir)
    variant, cuts = member_cuts(card)
    size = card["input_size"][0]
    low = min(cuts)
    bottom, _ = build_parts(variant, size, low)
    tops = [build_parts(variant, size, cut)[1] for cut in cuts]
    bridges = {c: build_span(variant, size, low, c) for c in sorted(set(cuts)) if c > low}
    prefix = str(export_dir / "variables" / "variables")
    status = tf.train.Checkpoint(bottom=bottom, tops=tops, bridges={f"cut{c}": b for c, b in bridges.items()}).read(prefix)
    status.assert_existing_objects_matched().expect_partial()
    reader = tf.train.load_checkpoint(prefix)

    def value(key: str) -> np.ndarray:
        return reader.get_tensor(f"{key}/.ATTRIBUTES/VARIABLE_VALUE")

    labels = {name: (export_dir / "assets" / sig["labels_asset"]).read_text().splitlines()
              for name, sig in card["signatures"].items()}
    own = [name for name in labels if name != "serving_default"  # brand signatures trained on their photos
           and reader.has_tensor(f"kernels/0/{name}/.ATTRIBUTES/VARIABLE_VALUE")]
    return Ensemble(
        variant=variant, size=size, cuts=cuts, bottom=bottom, bridges=bridges, tops=tops,
        kernels=[value(f"kernels/{i}/serving_default") for i in range(len(cuts))],
        biases=[value(f"biases/{i}/serving_default") for i in range(len(cuts))],
        own_heads={name: ([value(f"kernels/{i}/{name}") for i in range(len(cuts))],
                          [value(f"biases/{i}/{name}") for i in range(len(cuts))]) for name in own},
        temperatures={name: float(value(f"temperatures/{name}")) for name in labels}, labels=labels)


def check(export_dir: Path, photos: list[Path]) -> float:
    """Max |probability difference| between the rebuilt ensemble and the served serving_default."""
    ensemble = load_ensemble(export_dir)
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    blobs = tf.constant([p.read_bytes() for p in photos])
    served = serve(image_bytes=blobs)["probabilities"].numpy()
    rebuilt = ensemble.probabilities(data.preprocess_batch(blobs, ensemble.size)).numpy()
    return float(np.abs(served - rebuilt).max())


if __name__ == "__main__":
    from dataset.split import load_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--photos", type=int, default=8)
    args = parser.parse_args()
    val = [p.path for p in load_split() if p.split == "val"][: args.photos]
    print(f"rebuilt vs served on {len(val)} val photos: max |probability difference| {check(args.export_dir, val):.2e}")
