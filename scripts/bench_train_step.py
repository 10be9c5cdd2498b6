"""Images per second of one ResNet50 training step on this machine, to plan training runs.

    python -m scripts.bench_train_step --size 64 --batch 64                  # Keras on TensorFlow
    KERAS_BACKEND=torch python -m scripts.bench_train_step --size 64          # Keras on PyTorch (needs torch)

Random images, the model and optimizer of `training.train` (ResNet50 from
random init + softmax head, AdamW); the first steps (tracing, allocation) are
not timed. Run it alone: other jobs on the cores change the figure.
"""
from __future__ import annotations

import argparse
import time

import keras
import numpy as np

from training.train import Config, build_model, compile_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps, after 2 untimed ones")
    p.add_argument("--classes", type=int, default=196)
    args = p.parse_args(argv)

    model = build_model("resnet50", args.size, args.classes)
    compile_model(model, Config(size=args.size, batch=args.batch), steps_per_epoch=args.steps)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    y = np.eye(args.classes, dtype=np.float32)[rng.integers(0, args.classes, args.batch)]
    for _ in range(2):
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(args.steps):
        model.train_on_batch(x, y)
    seconds = time.perf_counter() - started
    print(f"ResNet50 train step, Keras {keras.__version__} on {keras.backend.backend()}, {args.size} px, "
          f"batch {args.batch}: {args.steps * args.batch / seconds:.1f} images/s")


if __name__ == "__main__":
    main()
