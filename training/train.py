"""Train a car classifier: ResNet50 (random init) + a softmax head.

    python -m training.train --model global --size 64 --epochs 15 --batch 64 --out runs/global
    python -m training.train --model audi --size 64 --epochs 30 --out runs/audi --init-from runs/global
    python -m training.train --out runs/global --resume      # continue where it stopped
    python -m training.train --model global --size 96 --teacher runs/lite0/teacher.npz --out runs/global-kd

`--model global` learns all 196 classes; a brand slug (plugins/<slug>/manifest.json)
learns only the classes whose make is one of that brand's "makes", and may start
its trunk from another run's checkpoint (--init-from).

A run folder holds, rewritten after every epoch:
    epoch-<N>.keras  the model with its optimizer state (for --resume), only the last epoch's
    ckpt.json        config, classes, preprocessing, epoch, per-epoch metrics, timings,
                     and "checkpoint": the name of that .keras file
`training/export.py` turns a run folder into a TF Serving SavedModel.

Any Keras 3 backend trains: `KERAS_BACKEND=torch python -m training.train ...`
runs the steps in PyTorch (about 2.5x TensorFlow's speed on this 2-core CPU,
`scripts/bench_train_step.py`) with the same tf.data input pipeline; the
.keras checkpoint it writes is exported by training/export.py under TensorFlow.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from training import data
from dataset.split import Photo, data_dir, load_split, split_hash

ARCHS = ("resnet50",)


@dataclass
class Config:
    model: str = "global"  # "global" or a brand slug
    arch: str = "resnet50"
    size: int = 64
    epochs: int = 10
    batch: int = 64
    lr: float = 2e-3  # AdamW peak learning rate, after linear warm-up, then cosine to 0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05  # not applied to biases and BatchNorm parameters
    label_smoothing: float = 0.1
    bn_momentum: float = 0.9  # Keras' 0.99 lags far behind on runs of a few hundred steps
    seed: int = 0
    out: str = "runs/global"
    init_from: str | None = None  # a run folder whose trunk initialises this model
    teacher: str | None = None  # teacher.npz of training.train_lite: distil its soft targets
    teacher_weight: float = 0.7  # target = (1 - w) * one-hot + w * teacher probabilities
    teacher_temperature: float = 2.0  # softens the teacher's probabilities (Hinton et al.)


def makes_for(model: str) -> list[str] | None:
    """None for the global model, else the Stanford Cars makes of that brand plugin."""
    if model == "global":
        return None
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, data_dir())
    if model not in plugins:
        raise SystemExit(f"unknown model {model!r}: use 'global' or one of {sorted(plugins)}")
    return list(plugins[model].makes)


def build_model(arch: str, size: int, num_classes: int, bn_momentum: float = 0.9) -> keras.Model:
    """Trunk (layer "trunk", global-average-pooled features) + Dense softmax "head"."""
    if arch != "resnet50":
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHS}")
    trunk = keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3), name="trunk"
    )
    for layer in trunk.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = bn_momentum
    inputs = keras.Input((size, size, 3), name="image")
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="head")(trunk(inputs))
    return keras.Model(inputs, outputs, name=f"{arch}_{num_classes}")


def compile_model(model: keras.Model, cfg: Config, steps_per_epoch: int) -> None:
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(cfg.warmup_epochs * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total - warmup, warmup_target=cfg.lr, warmup_steps=warmup
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="acc"), keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
        jit_compile=False,  # XLA on this CPU measured ~5x slower than the default kernels
    )


def machine() -> str:
    """Where a model was made: host, cores, and the Keras backend that ran it (KERAS_BACKEND)."""
    backend = keras.backend.backend()
    engine = f"TF {tf.__version__}"
    if backend == "torch":  # 31 vs 13 images/s for the train step on this CPU (scripts/bench_train_step.py)
        import torch

        engine = f"torch {torch.__version__} (data pipeline TF {tf.__version__})"
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} CPU cores, Keras {keras.__version__} on {engine}"


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(out: Path, model: keras.Model, state: dict) -> None:
    """Write epoch-<N>.keras, then ckpt.json naming it (atomically), then drop older
    epoch files: whenever the process dies, ckpt.json names a complete, matching file."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"epoch-{state['epoch']}.keras"
    model.save(out / name)
    write_json(out / "ckpt.json", {**state, "checkpoint": name})
    for old in out.glob("epoch-*.keras"):
        if old.name != name:
            old.unlink()


def load_checkpoint(run: Path, compile: bool = False) -> tuple[keras.Model, dict]:
    """The model (with optimizer state if compile) and the state of a run's last epoch."""
    state = json.loads((Path(run) / "ckpt.json").read_text())
    return keras.models.load_model(Path(run) / state["checkpoint"], compile=compile), state


def new_state(cfg: Config, classes: list[data.ClassInfo], photos: list[Photo]) -> dict:
    return {
        "config": asdict(cfg),
        "classes": [c.to_json() for c in classes],
        "preprocessing": {**data.PREPROCESSING, "size": cfg.size},
        "split_hash": split_hash(photos),
        "command": shlex.join([Path(sys.executable).name, "-m", "training.train", *sys.argv[1:]]),
        "commands": [],  # every invocation, resumes included
        "machine": machine(),
        "epoch": 0,
        "history": [],
        "train_seconds": 0.0,
    }


def teacher_targets(cfg: Config, classes: list[data.ClassInfo], photos: list[Photo]) -> dict[str, np.ndarray]:
    """Per train photo: (1 - w) * its one-hot label + w * the teacher's softened probabilities,
    the teacher restricted to `classes` (a brand model distils the teacher's brand columns)."""
    teacher = np.load(cfg.teacher)
    column = {int(c): i for i, c in enumerate(teacher["class_ids"])}
    columns = [column[c.class_id] for c in classes]
    row = {str(i): r for r, i in enumerate(teacher["image_ids"])}
    index = {c.class_id: i for i, c in enumerate(classes)}
    targets = {}
    for p in photos:
        if p.class_id not in index:
            continue
        logits = teacher["logits"][row[p.image_id], columns] / cfg.teacher_temperature
        probs = np.exp(logits - logits.max())
        target = cfg.teacher_weight * probs / probs.sum()
        target[index[p.class_id]] += 1 - cfg.teacher_weight
        targets[p.image_id] = target.astype(np.float32)
    return targets


def train(cfg: Config, resume: bool = False) -> dict:
    out = Path(cfg.out)
    keras.utils.set_random_seed(cfg.seed)
    photos = load_split()
    classes = data.class_list(photos, makes_for(cfg.model))
    train_photos = [p for p in photos if p.split == "train"]
    val_photos = [p for p in photos if p.split == "val"]
    soft = teacher_targets(cfg, classes, train_photos) if cfg.teacher else None
    train_ds = data.make_dataset(train_photos, classes, cfg.size, cfg.batch, training=True, seed=cfg.seed,
                                 soft_targets=soft)
    val_ds = data.make_dataset(val_photos, classes, cfg.size, 2 * cfg.batch, training=False)
    ids = {c.class_id for c in classes}
    n_train = sum(p.class_id in ids for p in train_photos)
    n_val = sum(p.class_id in ids for p in val_photos)
    steps = math.ceil(n_train / cfg.batch)

    if resume:
        model, state = load_checkpoint(out, compile=True)
        print(f"resuming {out} after epoch {state['epoch']}", flush=True)
    else:
        model = build_model(cfg.arch, cfg.size, len(classes), cfg.bn_momentum)
        if cfg.init_from:
            source, _ = load_checkpoint(Path(cfg.init_from))
            model.get_layer("trunk").set_weights(source.get_layer("trunk").get_weights())
            print(f"trunk initialised from {cfg.init_from}", flush=True)
        compile_model(model, cfg, steps)
        state = new_state(cfg, classes, photos)
    state["commands"].append(shlex.join([Path(sys.executable).name, "-m", "training.train", *sys.argv[1:]]))
    print(f"{cfg.model}: {len(classes)} classes, {n_train} train / {n_val} val photos, "
          f"{model.count_params():,} params, {steps} steps/epoch, size {cfg.size}", flush=True)

    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.time()
        fit = model.fit(train_ds, initial_epoch=epoch, epochs=epoch + 1, verbose=0).history
        val = model.evaluate(val_ds, verbose=0, return_dict=True)
        seconds = time.time() - t0
        row = {
            "epoch": epoch + 1,
            "train_loss": fit["loss"][-1],
            "train_acc": fit["acc"][-1],
            "val_loss": val["loss"],
            "val_top1": val["acc"],
            "val_top5": val["top5"],
            "lr": float(model.optimizer.learning_rate),
            "seconds": seconds,
        }
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["train_seconds"] += seconds
        save_checkpoint(out, model, state)
        print(
            f"epoch {epoch + 1}/{cfg.epochs} train loss {row['train_loss']:.3f} acc {row['train_acc']:.3f} | "
            f"val loss {row['val_loss']:.3f} top1 {row['val_top1']:.3f} top5 {row['val_top5']:.3f} | "
            f"lr {row['lr']:.2e} {seconds:.0f}s",
            flush=True,
        )
    return state


def parse_args(argv: list[str] | None = None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Config()
    p.add_argument("--model", default=defaults.model, help="'global' or a brand plugin slug")
    p.add_argument("--arch", default=defaults.arch, choices=ARCHS)
    for name in ("size", "epochs", "batch", "seed"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    for name in ("lr", "warmup_epochs", "weight_decay", "label_smoothing", "bn_momentum", "teacher_weight",
                 "teacher_temperature"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=getattr(defaults, name))
    p.add_argument("--out", default=None, help="run folder (default runs/<model>)")
    p.add_argument("--init-from", default=None, help="run folder whose trunk initialises this model")
    p.add_argument("--teacher", default=None, help="teacher.npz (training.train_lite) to distil from")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last epoch (a new run if --out has none)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume")
    args["out"] = args["out"] or f"runs/{args['model']}"
    state = Path(args["out"]) / "ckpt.json"
    if resume and state.exists():  # the run's own config (and its LR schedule) wins over the other flags
        return Config(**json.loads(state.read_text())["config"]), True
    return Config(**args), False


if __name__ == "__main__":
    train(*parse_args())
