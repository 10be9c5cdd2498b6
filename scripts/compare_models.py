"""Batch-1 latency of two SavedModels side by side, in one process, on the same photos.

    python -m scripts.compare_models serving_models/efficientnet_lite0/5 runs/efficientnet_lite0-4 [--calls 200]

Calls alternate between the two models photo by photo (test-split photos, raw
bytes through the serving signature, preprocessing included), so both see the
same machine load; prints each one's p50 / p95 and the ratio of their p50s. Run
it with the cores to itself: other jobs move the absolute figures, less the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import tensorflow as tf

from dataset.split import load_split


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.compare_models", description=__doc__.split("\n")[0])
    parser.add_argument("model_a", help="SavedModel folder (a version folder)")
    parser.add_argument("model_b", help="SavedModel folder to compare with")
    parser.add_argument("--calls", type=int, default=200, help="batch-1 calls per model")
    args = parser.parse_args(argv)

    photos = [p.path.read_bytes() for p in load_split() if p.split == "test"][: args.calls]
    serve = {name: tf.saved_model.load(name).signatures["serving_default"] for name in (args.model_a, args.model_b)}
    ms: dict[str, list[float]] = {name: [] for name in serve}
    for fn in serve.values():  # trace and warm
        fn(image_bytes=tf.constant(photos[:1]))
    for i in range(args.calls):
        for name, fn in serve.items():
            started = time.perf_counter()
            fn(image_bytes=tf.constant([photos[i % len(photos)]]))
            ms[name].append((time.perf_counter() - started) * 1000)
    for name, values in ms.items():
        print(f"{name}: p50 {statistics.median(values):.1f} ms, p95 {statistics.quantiles(values, n=20)[18]:.1f} ms ({len(values)} calls)")
    a, b = (statistics.median(ms[n]) for n in serve)
    print(f"p50 ratio {args.model_a} / {args.model_b}: {a / b:.2f}")


if __name__ == "__main__":
    main()
