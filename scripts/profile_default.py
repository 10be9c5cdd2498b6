"""Where one batched Predict of the default model spends its time (issue 25, "know the limit").

    python -m scripts.profile_default [--batch 32] [--rounds 5] [--intra-op 1]

Times, in this process and one after the other on the same 32 test photos:
- the whole serving_default call of the served SavedModel (what the model server runs);
- its stages rebuilt as Keras parts: decode + resize (training.data.preprocess_batch),
  the stem, each EfficientNet-Lite block, the head conv + pooling, and the
  members' linear heads; each block on activations of its own input shape.

Convolution time does not depend on the weights' values, so the blocks are built
with ImageNet initialisation rather than restored: only their shapes matter. The
ensemble's cost is then the sum over what it runs: the shared blocks below the
lowest cut once, every block above it once per member that runs it (v12: blocks
6-10 twice, as member 0's and as the bridge to member 1's cut; blocks 11-15
twice), the head twice. The difference between the whole call and that sum is
what the graph spends around the layers (the in-graph size guard, gathers,
softmaxes, the call itself). Each stage also gets its GFLOP/s (2 x multiply-adds
per second, training.lite_arch), against what TensorFlow sustains here on a
dense 1x1 convolution (scripts.bench.hardware_limit).

Default --intra-op 1: the model server's setting (harness.stack.INTRA_OP_THREADS), so one core; --inter-op 1
runs one op at a time (the model server may run the two members side by side on its two cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import tensorflow as tf

from builders.logo_policy import latest_version
from harness.stack import INTRA_OP_THREADS
from router_service.settings import DEFAULT_GLOBAL_MODEL
from scripts.bench import hardware_limit, test_photos
from training import data
from training.efficientnet_lite import build_parts, build_span
from training.lite_arch import block_list, multiply_adds
from training.lite_savedmodel import member_cuts

OUT = Path("reports/profile_default.json")


def median_ms(fn, rounds: int) -> float:
    fn()  # trace and warm: oneDNN's first call on a shape is slow
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def timed(layer, inputs: tf.Tensor, rounds: int) -> float:
    """Median ms of one call of `layer` in a graph; only a scalar leaves it, so copying the activations
    out is not timed."""
    fn = tf.function(lambda v: tf.reduce_sum(layer(v, training=False)))
    return median_ms(lambda: fn(inputs).numpy(), rounds)


def profile(batch: int, rounds: int) -> dict:
    served = latest_version(DEFAULT_GLOBAL_MODEL)
    card = json.loads((served / "model_card.json").read_text())
    variant, cuts = member_cuts(card)
    size, classes = card["input_size"][0], card["signatures"]["serving_default"]["num_classes"]
    blobs = tf.constant(test_photos(batch))
    serve = tf.saved_model.load(str(served)).signatures["serving_default"]
    whole = median_ms(lambda: serve(image_bytes=blobs)["probabilities"].numpy(), rounds)

    stages = {}
    images = data.preprocess_batch(blobs, size)
    preprocess = tf.function(lambda b: tf.reduce_sum(data.preprocess_batch(b, size)))
    stages["decode + resize"] = (median_ms(lambda: preprocess(blobs).numpy(), rounds), 0, 1)
    stem, _ = build_parts(variant, size, 0)
    x = stem(images, training=False)
    stages["stem"] = (timed(stem, images, rounds), multiply_adds(variant, size, 0, 0)["total"], 1)
    low = min(cuts)
    for i in range(len(block_list(variant))):
        span = build_span(variant, size, i, i + 1)
        # below the lowest cut: once, shared; above it: by each member fine-tuned from below it, and once more
        # as the bridge (ImageNet blocks) to any later cut
        runs = 1 if i < low else sum(c <= i for c in cuts) + any(c > i for c in cuts)
        ms = timed(span, x, rounds)
        stages[f"block{i}"] = (ms, multiply_adds(variant, size, i, i + 1, stem=False, head=False)["total"], runs)
        x = span(x, training=False)
    _, head = build_parts(variant, size, len(block_list(variant)))
    features = head(x, training=False)
    stages["head conv + pooling"] = (timed(head, x, rounds),
                                     multiply_adds(variant, size, len(block_list(variant)))["total"], len(cuts))
    kernel = tf.random.normal([features.shape[1], classes])
    stages["linear heads + softmax"] = (timed(lambda f, training: tf.nn.softmax(f @ kernel), features, rounds),
                                        features.shape[1] * classes, len(cuts))

    limit = hardware_limit()["conv1x1_gflops_per_s"]
    rows, accounted = [], 0.0
    for name, (ms, macs, runs) in stages.items():
        accounted += ms * runs
        rows.append({"stage": name, "ms_per_batch": round(ms, 2), "runs_per_photo": runs,
                     "ms_in_the_ensemble": round(ms * runs, 2),
                     "gflops_per_s": round(2 * macs * batch / (ms / 1000) / 1e9, 1) if macs else None})
    return {"model": f"{DEFAULT_GLOBAL_MODEL}/{served.name}", "batch": batch, "rounds": rounds,
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "conv1x1_limit_gflops_per_s": limit, "whole_call_ms": round(whole, 1),
            "stages_sum_ms": round(accounted, 1), "around_the_layers_ms": round(whole - accounted, 1),
            "stages": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.profile_default", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--intra-op", type=int, default=INTRA_OP_THREADS, help="0 = TensorFlow's choice")
    parser.add_argument("--inter-op", type=int, default=1,
                        help="1: one op at a time, so the whole call is comparable with the stages' sum")
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    report = profile(args.batch, args.rounds)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=1) + "\n")
    whole = report["whole_call_ms"]
    print(f"{report['model']}, batch {report['batch']}, intra-/inter-op threads {report['intra_op_threads']}/"
          f"{report['inter_op_threads']}: whole call "
          f"{whole} ms; the stages sum to {report['stages_sum_ms']} ms, {report['around_the_layers_ms']} ms around them; "
          f"1x1 conv limit {report['conv1x1_limit_gflops_per_s']} GFLOP/s")
    print("| stage | ms per batch | runs per photo | ms in the ensemble | share of the call | GFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in report["stages"]:
        print(f"| {row['stage']} | {row['ms_per_batch']} | {row['runs_per_photo']} | {row['ms_in_the_ensemble']} | "
              f"{row['ms_in_the_ensemble'] / whole:.1%} | {row['gflops_per_s'] or ''} |")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
