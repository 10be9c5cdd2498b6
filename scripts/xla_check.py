"""Does XLA (`jit_compile=True`) make the default model faster here? (issue 25, lever "compiled graphs")

    python -m scripts.xla_check [--photos 64] [--rounds 5]

Rebuilds the served default's ensemble from its SavedModel (training.lite_savedmodel)
and times its network, on preprocessed test photos, as a plain tf.function and as
an XLA-compiled one, in turns, at batch 1 and batch 32, on one core (the model
server's intra-op setting), then the largest probability difference between the two.
Decoding stays outside: XLA does not compile tf.io.decode_image.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tensorflow as tf

from builders.logo_policy import latest_version
from harness.stack import INTRA_OP_THREADS
from router_service.settings import DEFAULT_GLOBAL_MODEL
from scripts.bench import test_photos
from training import data
from training.lite_savedmodel import load_ensemble


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.xla_check", description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(INTRA_OP_THREADS)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    served = latest_version(DEFAULT_GLOBAL_MODEL)
    ensemble = load_ensemble(served)
    images = data.preprocess_batch(tf.constant(test_photos(args.photos)), ensemble.size)
    variants = {"plain": tf.function(ensemble.probabilities),
                "xla": tf.function(ensemble.probabilities, jit_compile=True)}
    outputs = {name: fn(images[:32]).numpy() for name, fn in variants.items()}  # compile and warm, batch 32
    for fn in variants.values():
        fn(images[:1])  # and batch 1
    times: dict[str, dict[str, list[float]]] = {name: {"batch 1": [], "batch 32": []} for name in variants}
    for round_ in range(args.rounds):
        for name, fn in variants.items():
            for i in range(8):
                started = time.perf_counter()
                fn(images[(round_ * 8 + i) % args.photos][tf.newaxis]).numpy()
                times[name]["batch 1"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            fn(images[32 * (round_ % 2): 32 * (round_ % 2) + 32]).numpy()
            times[name]["batch 32"].append((time.perf_counter() - started) * 1000)
    print(f"{served}, one core, {args.rounds} rounds in turns (median ms):")
    for name in variants:
        print(f"  {name:5s}: batch 1 {statistics.median(times[name]['batch 1']):.1f}, "
              f"batch 32 {statistics.median(times[name]['batch 32']):.1f}")
    for shape in ("batch 1", "batch 32"):
        ratio = statistics.median(times["xla"][shape]) / statistics.median(times["plain"][shape])
        print(f"  xla / plain, {shape}: {ratio:.2f}x the time")
    diff = np.abs(outputs["xla"] - outputs["plain"])
    print(f"  largest probability difference {diff.max():.2e}; top-1 agreement "
          f"{np.mean(outputs['xla'].argmax(1) == outputs['plain'].argmax(1)):.3f} on 32 photos")


if __name__ == "__main__":
    main()
