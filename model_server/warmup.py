"""SavedModel warm-up: replay assets.extra/tf_serving_warmup_requests while a version loads.

As TF Serving does (servables/tensorflow/saved_model_warmup_util.cc and
saved_model_warmup.cc): the file is optional; it is a TFRecord of
PredictionLog records, at most 1000; each PredictLog's request runs against the
version being loaded (its model_spec name and version are not looked up); a
record that fails, or a log type other than Predict, fails the load. Only
Predict is served here, so Classify/Regress/MultiInference records are refused
like SessionRun records are in TF Serving.

The point is the first client call: without warm-up it pays for graph
optimisation and kernel set-up (seconds on 2 cores for a 320 px EfficientNet).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from common.logs import log_event
from model_server.errors import InvalidArgument, Unimplemented
from model_server.predict import run_predict
from model_server.repository import Servable

logger = logging.getLogger("carrecog.model_server")

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_RECORDS = 1000  # WarmupConsts::kMaxNumRecords
WARMUP_THREADS = 4


def run_warmup(servable: Servable, export_dir: Path, max_image_pixels: int = 0) -> int:
    """Replay the version's warm-up records; returns how many ran (0 when it has no file).

    The records run on several threads (TF Serving's ModelWarmupOptions.num_model_warmup_threads):
    each signature's first call is mostly graph optimisation, which overlaps well (8.2 s -> 5.3 s
    for v5's 7 signatures on 2 cores, 1 vs 4 threads).
    """
    path = Path(export_dir) / WARMUP_FILE
    if not path.is_file():
        return 0
    started = time.perf_counter()
    requests = [request_of(record, path) for record in read_records(path)]
    with ThreadPoolExecutor(min(WARMUP_THREADS, len(requests)) or 1, thread_name_prefix="warmup") as pool:
        for done in [pool.submit(run_predict, servable, r, max_image_pixels=max_image_pixels) for r in requests]:
            done.result()  # the first failure fails the load
    log_event(logger, "warm-up done", model=servable.name, version=servable.version, records=len(requests),
              seconds=round(time.perf_counter() - started, 2))
    return len(requests)


def read_records(path: Path) -> list[bytes]:
    try:
        records = [bytes(r) for r in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()]
    except tf.errors.DataLossError as exc:
        raise InvalidArgument(f"{exc.message}. Please verify your warmup data is in TFRecord format.") from None
    if len(records) > MAX_RECORDS:
        raise InvalidArgument(f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {path}")
    return records


def request_of(record: bytes, path: Path) -> predict_pb2.PredictRequest:
    log = prediction_log_pb2.PredictionLog()
    try:
        log.ParseFromString(record)
    except Exception:
        raise InvalidArgument(f"Failed to parse warmup record from {path}") from None
    kind = log.WhichOneof("log_type")
    if kind != "predict_log":
        raise Unimplemented(f"Unsupported log_type for warmup: {kind} (this stand-in serves Predict only)")
    return log.predict_log.request
