"""Whole photos made from tight crops: a catalogue car pasted at a known box onto a background.

The shared photos are all cropped to the car's box, so the whole-photo case
(a car covering half or two thirds of the picture) has to be built: the crop
is pasted, at its own resolution, into a larger frame whose width makes it
cover the wanted share. The box is then known exactly, which is what trains
and measures the localiser (training/localizer.py) and what `make evaluate`
uses for the framing table.

Backgrounds are real non-car photographs (../shared/data/open_set_dev, kind
not_car), split in two halves by image id so that the localiser is trained on
one half and measured on the other, and plain grey.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dataset.split import data_dir

GREY = (124, 124, 124)


@dataclass(frozen=True)
class Composite:
    image: np.ndarray          # uint8 [H, W, 3] BGR
    boxes: np.ndarray          # float32 [n, 4] x_min, y_min, x_max, y_max in [0, 1], largest car first


def in_half(image_id: str, half: str) -> bool:
    """open_set_dev is split in two halves, "fit" and "eval", by a hash of the image id."""
    return int(hashlib.sha1(image_id.encode()).hexdigest(), 16) % 2 == (0 if half == "fit" else 1)


def background_paths(half: str, root: Path | None = None) -> list[Path]:
    """The non-car development photos of one half ("fit" or "eval")."""
    base = (root or data_dir()) / "open_set_dev"
    with open(base / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "not_car"]
    return sorted(base / r["file"] for r in rows if in_half(r["image_id"], half))


def read_bgr(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"unreadable image {path}")
    return image


def frame_around(car: np.ndarray, cover: float, background: np.ndarray | None, rng: np.random.Generator,
                 aspect: float = 4 / 3, centred: bool = False) -> Composite:
    """`car` pasted so that it covers `cover` of the frame's width, in a frame of `aspect` (w/h);
    the frame grows taller when the car would not fit. Centred, or at a uniformly random position."""
    ch, cw = car.shape[:2]
    width = int(round(cw / cover))
    height = max(int(round(width / aspect)), int(np.ceil(ch / 0.95)))
    canvas = _background(background, width, height, rng)
    if centred:
        x, y = (width - cw) // 2, (height - ch) // 2
    else:
        x, y = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
    canvas[y:y + ch, x:x + cw] = car
    box = np.array([[x / width, y / height, (x + cw) / width, (y + ch) / height]], np.float32)
    return Composite(canvas, box)


def two_cars(big: np.ndarray, small: np.ndarray, cover: float, ratio: float, background: np.ndarray | None,
             rng: np.random.Generator) -> Composite:
    """Two cars side by side: `big` covering `cover` of the width, `small` scaled to `ratio` of big's width."""
    bh, bw = big.shape[:2]
    scale = ratio * bw / small.shape[1]
    small = cv2.resize(small, (max(1, int(small.shape[1] * scale)), max(1, int(small.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    sh, sw = small.shape[:2]
    width = int(round(bw / cover))
    width = max(width, bw + sw + 4)
    height = max(int(round(width * 3 / 4)), int(np.ceil(max(bh, sh) / 0.95)))
    canvas = _background(background, width, height, rng)
    big_left = bool(rng.integers(0, 2))
    bx = int(rng.integers(0, width - bw - sw + 1)) if big_left else None
    if big_left:
        sx = int(rng.integers(bx + bw, width - sw + 1))
    else:
        sx = int(rng.integers(0, width - bw - sw + 1))
        bx = int(rng.integers(sx + sw, width - bw + 1))
    by, sy = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, height - sh + 1))
    canvas[by:by + bh, bx:bx + bw] = big
    canvas[sy:sy + sh, sx:sx + sw] = small
    boxes = np.array([[bx / width, by / height, (bx + bw) / width, (by + bh) / height],
                      [sx / width, sy / height, (sx + sw) / width, (sy + sh) / height]], np.float32)
    return Composite(canvas, boxes)


def _background(background: np.ndarray | None, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    if background is None:
        return np.full((height, width, 3), GREY, np.uint8)
    bh, bw = background.shape[:2]
    # a random crop of the background with the frame's aspect, resized to the frame, maybe mirrored
    scale = min(bw / width, bh / height) * rng.uniform(0.7, 1.0)
    cw, ch = max(8, int(width * scale)), max(8, int(height * scale))
    x, y = int(rng.integers(0, bw - cw + 1)), int(rng.integers(0, bh - ch + 1))
    crop = cv2.resize(background[y:y + ch, x:x + cw], (width, height), interpolation=cv2.INTER_LINEAR)
    return crop[:, ::-1].copy() if rng.integers(0, 2) else crop


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boxes x_min, y_min, x_max, y_max."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0
