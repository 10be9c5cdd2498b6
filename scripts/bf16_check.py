"""Issue 25's lower-precision lever: does oneDNN's bfloat16 rewrite speed up the default model here?

    python -m scripts.bf16_check [--photos 128]

The rewrite is a process-wide graph option, so the two runs are two child processes, one after the other,
on the same test photos: fp32 as served, then with `auto_mixed_precision_onednn_bfloat16` on (what TF
Serving would take as a session config's rewrite option). Prints each run's batched throughput (batches
of 32) and batch-1 p50, and how far the bfloat16 answers are from the fp32 ones.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL = "serving_models/efficientnet_lite0"


def run(bf16: bool, photos: int, out: Path) -> dict:
    import tensorflow as tf

    from scripts.bench import test_photos

    if bf16:
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    latest = max((p for p in Path(MODEL).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    serve = tf.saved_model.load(str(latest)).signatures["serving_default"]
    blobs = test_photos(photos)
    serve(image_bytes=tf.constant(blobs[:32]))  # build the graph for both shapes before timing
    serve(image_bytes=tf.constant(blobs[:1]))
    started, probabilities = time.perf_counter(), []
    for i in range(0, len(blobs), 32):
        probabilities.append(serve(image_bytes=tf.constant(blobs[i:i + 32]))["probabilities"].numpy())
    batched = len(blobs) / (time.perf_counter() - started)
    batch1 = []
    for blob in blobs[:24]:
        started = time.perf_counter()
        serve(image_bytes=tf.constant([blob]))
        batch1.append((time.perf_counter() - started) * 1000)
    np.save(out, np.concatenate(probabilities))
    return {"version": int(latest.name), "bf16": bf16, "images_per_s": round(batched, 1),
            "batch1_p50_ms": round(float(np.median(batch1)), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.bf16_check", description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=128)
    parser.add_argument("--child", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run(args.child == "bf16", args.photos, args.out)))
        return
    folder = Path(tempfile.mkdtemp(prefix="bf16-"))
    results = {}
    for mode in ("fp32", "bf16"):
        child = subprocess.run([sys.executable, "-m", "scripts.bf16_check", "--child", mode, "--photos",
                                str(args.photos), "--out", str(folder / f"{mode}.npy")],
                               capture_output=True, text=True, check=True)
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    fp32, bf16 = (np.load(folder / f"{mode}.npy") for mode in ("fp32", "bf16"))
    results["max_abs_probability_diff"] = round(float(np.abs(fp32 - bf16).max()), 4)
    results["top1_agreement"] = round(float((fp32.argmax(1) == bf16.argmax(1)).mean()), 4)
    results["batched_ratio"] = round(results["bf16"]["images_per_s"] / results["fp32"]["images_per_s"], 2)
    results["batch1_ratio"] = round(results["bf16"]["batch1_p50_ms"] / results["fp32"]["batch1_p50_ms"], 2)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
