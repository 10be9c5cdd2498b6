"""Input pipelines for the classifiers, and THE preprocessing function.

`preprocess(image_bytes, size)` is the only definition of how encoded bytes
become a model input. Training, evaluation and the exported SavedModel
(`training/export.py`, in-graph) all call it, so what the served model sees is
exactly what it was trained on:

  1. decode JPEG / PNG / GIF (first frame) / BMP / WebP to 8-bit RGB
     (grayscale is repeated to 3 channels, alpha is dropped, CMYK JPEGs are
     converted to RGB by libjpeg, 16-bit PNGs are scaled to 8 bit);
  2. resize to size x size with bilinear + antialias, ignoring aspect ratio
     (the photos are already cropped to the car's bounding box);
  3. normalise to [-1, 1]: x / 127.5 - 1, channels in RGB order.

Training adds a cheap augmentation on top (random scale/translate crop and a
horizontal flip) in `augment`; evaluation and serving never augment.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import tensorflow as tf

from dataset.split import Photo

PREPROCESSING = {
    "function": "training.data.preprocess",
    "decode": "tf.io.decode_image(channels=3, expand_animations=False), uint8 RGB",
    "resize": "tf.image.resize(size x size, bilinear, antialias=True), aspect ratio not kept",
    "normalise": "x / 127.5 - 1 (range [-1, 1]), RGB order",
}


@dataclass(frozen=True)
class ClassInfo:
    class_id: int  # Stanford Cars class id (1..196)
    make: str
    model: str
    year: int

    @property
    def label(self) -> str:
        """The label string served with the probabilities: "<make>|<model>|<year>"."""
        return f"{self.make}|{self.model}|{self.year}"

    def to_json(self) -> dict:
        return {**asdict(self), "label": self.label}


def class_list(photos: Sequence[Photo], makes: Sequence[str] | None = None) -> list[ClassInfo]:
    """The classes (sorted by class id) of the photos, optionally only those of `makes`."""
    seen = {p.class_id: ClassInfo(p.class_id, p.make, p.model, p.year) for p in photos}
    classes = [seen[k] for k in sorted(seen)]
    if makes is not None:
        classes = [c for c in classes if c.make in set(makes)]
    if not classes:
        raise ValueError(f"no classes for makes {makes}")
    return classes


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
    """Encoded image bytes (scalar string) -> uint8 [H, W, 3] RGB.

    A corrupt or unsupported image raises InvalidArgumentError at run time.
    """
    image = tf.io.decode_image(image_bytes, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resize_normalise(image: tf.Tensor, size: int) -> tf.Tensor:
    """Decoded RGB [H, W, 3] (uint8 or float 0..255) -> float32 [size, size, 3] in [-1, 1] (steps 2 and 3)."""
    image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear", antialias=True)
    return image / 127.5 - 1.0


def preprocess(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded image bytes (scalar string) -> float32 [size, size, 3] in [-1, 1]."""
    return resize_normalise(decode(image_bytes), size)


def preprocess_batch(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """A batch of encoded images [N] -> float32 [N, size, size, 3]; used in-graph by the export."""
    return tf.map_fn(
        lambda b: preprocess(b, size),
        image_bytes,
        fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
    )


def augment(image: tf.Tensor, size: int) -> tf.Tensor:
    """Cheap train-time jitter on a preprocessed image: random crop after upscaling by
    up to 1/4 (scale + translate), and a random horizontal flip."""
    scale = tf.random.uniform([], 1.0, 1.25)
    big = tf.cast(tf.round(scale * size), tf.int32)
    image = tf.image.resize(image, [big, big], method="bilinear")
    image = tf.image.random_crop(image, [size, size, 3])
    return tf.image.random_flip_left_right(image)


def make_dataset(
    photos: Sequence[Photo],
    classes: Sequence[ClassInfo],
    size: int,
    batch: int,
    training: bool,
    seed: int = 0,
    soft_targets: Mapping[str, np.ndarray] | None = None,
) -> tf.data.Dataset:
    """(image, target) batches for the photos whose class is in `classes`.

    The target is the one-hot label, or `soft_targets[image_id]` (a probability
    row over `classes`, e.g. a teacher's) where given. Preprocessed images are
    cached in memory (64 px: ~50 kB each), so files are decoded once; training
    shuffles each epoch and augments after the cache.
    """
    index = {c.class_id: i for i, c in enumerate(classes)}
    photos = [p for p in photos if p.class_id in index]
    paths = tf.constant([str(p.path) for p in photos])
    one_hot = np.eye(len(classes), dtype=np.float32)
    targets = np.stack([soft_targets[p.image_id] if soft_targets else one_hot[index[p.class_id]] for p in photos])
    ds = tf.data.Dataset.from_tensor_slices((paths, targets))
    ds = ds.map(
        lambda path, y: (preprocess(tf.io.read_file(path), size), y),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).cache()
    if training:
        ds = ds.shuffle(len(photos), seed=seed, reshuffle_each_iteration=True)
        ds = ds.map(lambda x, y: (augment(x, size), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)
