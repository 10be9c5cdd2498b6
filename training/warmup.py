"""TF Serving warm-up records for an exported SavedModel.

    python -m training.warmup serving_models/global/2 [--signature serving_default ...]

writes <export dir>/assets.extra/tf_serving_warmup_requests: a TFRecord of
PredictionLog records, one PredictRequest per signature, each carrying one
synthetic JPEG. TF Serving (and the stand-in model_server) replays them while
loading the version, before it reports the version AVAILABLE, so the first
client call does not pay for graph optimisation and kernel set-up (seconds for
a 320 px EfficientNet on 2 cores). See
https://www.tensorflow.org/tfx/serving/saved_model_warmup.

The image is drawn, not taken from the data: a SavedModel in git must not
carry a copy of a data photo. What warms the graph is the decode, resize and
network path, which any JPEG of a photo's size exercises.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from model_server.warmup import WARMUP_FILE  # where TF Serving and the stand-in look

INPUT_ALIAS = "image_bytes"


def synthetic_jpeg(width: int = 400, height: int = 267) -> bytes:
    """A deterministic photo-sized JPEG: smooth colour gradients with a dark band (a "road")."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([255 * x / width, 255 * y / height, 128 + 64 * np.sin(x / 17 + y / 23)], axis=-1)
    image[int(height * 0.7):] *= 0.4
    return tf.io.encode_jpeg(tf.constant(image.clip(0, 255).astype(np.uint8)), quality=90).numpy()


def warmup_records(model_name: str, signatures: Sequence[str]) -> list[prediction_log_pb2.PredictionLog]:
    image = synthetic_jpeg()
    records = []
    for signature in signatures:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model_name
        request.model_spec.signature_name = signature
        request.inputs[INPUT_ALIAS].CopyFrom(tf.make_tensor_proto([image], dtype=tf.string))
        records.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return records


def write_warmup_requests(export_dir: Path, model_name: str, signatures: Sequence[str]) -> Path:
    """Write one warm-up Predict per signature into export_dir's assets.extra/."""
    path = Path(export_dir) / WARMUP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in warmup_records(model_name, signatures):
            writer.write(record.SerializeToString())
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", type=Path, help="a SavedModel version folder, e.g. serving_models/global/2")
    p.add_argument("--signature", action="append",
                   help="signature to warm (repeatable; default: every signature in saved_model.pb)")
    args = p.parse_args(argv)
    signatures = args.signature or sorted(tf.saved_model.load(str(args.export_dir)).signatures)
    path = write_warmup_requests(args.export_dir, args.export_dir.parent.name, signatures)
    print(f"wrote {path}: {len(signatures)} record(s) for {', '.join(signatures)}")


if __name__ == "__main__":
    main()
