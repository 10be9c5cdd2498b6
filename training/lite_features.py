"""Cache the frozen lower part of an EfficientNet-Lite over the split's photos.

    python -m training.lite_features --variant lite0 --size 256 --cut 11 --views 4 --out runs/lite0

Fine-tuning a whole EfficientNet-Lite0 runs at ~7 images/s on the 2 CPU cores
here; its blocks from `--cut` on train at ~37 images/s from cached
activations. So the stem and the first `cut` blocks keep their ImageNet
weights, run once per photo and view, and their outputs are stored as float16
`.npy` memory maps in the run folder:

    <out>/features-train.npy   [views, n_train, H, W, C]
    <out>/features-val.npy     [1, n_val, H, W, C]    (plain view only)
    <out>/features-test.npy    [1, n_test, H, W, C]
    <out>/features.json        variant, size, cut, views, photo ids per split, progress

Train view 0 is the plain photo (`training.data.preprocess`, exactly what is
served), view 1 its mirror image, views 2+ a random crop of 80-100% of each side
at a random place, mirrored at random (fixed seeds). Progress is saved every
chunk, so a stopped run continues where it left off when started again with the
same arguments.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import data
from training.efficientnet_lite import VARIANTS, build_parts, load_imagenet_weights
from dataset.split import load_split, split_hash

CHUNK = 128


def view(image_bytes: tf.Tensor, size: int, index: int, seed: int) -> tf.Tensor:
    """View `index` of a photo, preprocessed as in serving (see the module docstring)."""
    if index == 0:
        return data.preprocess(image_bytes, size)
    if index == 1:
        return tf.image.flip_left_right(data.preprocess(image_bytes, size))
    image = data.decode(image_bytes)
    shape = tf.shape(image)[:2]
    seeds = tf.random.experimental.stateless_split([seed, index], 4)
    frac = tf.random.stateless_uniform([2], seeds[0], 0.8, 1.0)
    crop = tf.cast(tf.cast(shape, tf.float32) * frac, tf.int32)
    offset = tf.cast(tf.random.stateless_uniform([2], seeds[1]) * tf.cast(shape - crop + 1, tf.float32), tf.int32)
    image = image[offset[0] : offset[0] + crop[0], offset[1] : offset[1] + crop[1]]
    image = data.resize_normalise(image, size)
    flip = tf.random.stateless_uniform([], seeds[2]) < 0.5
    return tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)


def cache(variant: str, size: int, cut: int, views: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    photos = load_split()
    meta_path = out / "features.json"
    config = {"variant": variant, "size": size, "cut": cut, "views": views, "split_hash": split_hash(photos)}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta and meta["config"] != config:
        raise SystemExit(f"{out} holds features for {meta['config']}; use another --out")
    meta.setdefault("config", config)
    meta.setdefault("progress", {})
    bottom, top = build_parts(variant, size, cut)
    load_imagenet_weights([bottom, top], variant)
    run_bottom = tf.function(lambda x: bottom(x, training=False))
    shape = tuple(bottom.output.shape[1:])
    for split in ("train", "val", "test"):
        subset = [p for p in photos if p.split == split]
        meta.setdefault("ids", {})[split] = [p.image_id for p in subset]
        meta.setdefault("class_ids", {})[split] = [p.class_id for p in subset]
        n_views = views if split == "train" else 1
        path = out / f"features-{split}.npy"
        mode = "r+" if path.exists() else "w+"
        array = np.lib.format.open_memmap(path, mode=mode, dtype=np.float16, shape=(n_views, len(subset), *shape))
        for v in range(n_views):
            key = f"{split}/{v}"
            start = meta["progress"].get(key, 0)
            t0 = time.time()
            for i in range(start, len(subset), CHUNK):
                chunk = subset[i : i + CHUNK]
                images = tf.stack([view(tf.io.read_file(str(p.path)), size, v, seed=int(p.image_id)) for p in chunk])
                array[v, i : i + len(chunk)] = run_bottom(images).numpy().astype(np.float16)
                array.flush()
                meta["progress"][key] = i + len(chunk)
                meta_path.write_text(json.dumps(meta))
                done = i + len(chunk) - start
                rate = done / (time.time() - t0)
                print(f"{key}: {i + len(chunk)}/{len(subset)} ({rate:.0f} photos/s, "
                      f"{(len(subset) - i - len(chunk)) / rate / 60:.1f} min left)", flush=True)
        del array
    return meta


def load(out: Path, split: str) -> tuple[np.ndarray, list[str], list[int]]:
    """(features [views, n, H, W, C] float16 memory map, image ids, class ids) of a finished cache."""
    meta = json.loads((out / "features.json").read_text())
    n_views = meta["config"]["views"] if split == "train" else 1
    for v in range(n_views):
        if meta["progress"].get(f"{split}/{v}", 0) < len(meta["ids"][split]):
            raise SystemExit(f"{out}: {split} view {v} is not finished; run training.lite_features again")
    return np.load(out / f"features-{split}.npy", mmap_mode="r"), meta["ids"][split], meta["class_ids"][split]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="lite0", choices=sorted(VARIANTS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--cut", type=int, default=11, help="first block that is fine-tuned (not cached)")
    p.add_argument("--views", type=int, default=4, help="views per train photo (plain, mirror, random crops)")
    p.add_argument("--out", default="runs/lite0")
    args = p.parse_args(argv)
    cache(args.variant, args.size, args.cut, args.views, Path(args.out))


if __name__ == "__main__":
    main()
