"""A bounded load test of RecognitionService/Recognize against a running router (loopback only).

    python -m scripts.load_test --address 127.0.0.1:50050 --requests 200 --concurrency 8
    python -m scripts.load_test --requests 100 --concurrency 1 --force-model global   # one model's latency

Sends shared test-split photos round-robin and prints throughput, latency
percentiles and the status codes seen, as one JSON object.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from training.split import load_split


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default="127.0.0.1:50050")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--force-model", default="", help="send every photo to this model (compare models' latency)")
    parser.add_argument("--skip-logo", action="store_true", help="skip the logo stage (model latency alone)")
    args = parser.parse_args(argv)
    photos = [p.path.read_bytes() for p in load_split() if p.split == "test"][:64]
    options = pb.RecognizeOptions(force_model=args.force_model, skip_logo=args.skip_logo)
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)

        def one(i: int) -> None:
            started = time.perf_counter()
            try:
                stub.Recognize(pb.RecognizeRequest(image=photos[i % len(photos)], options=options), timeout=args.timeout)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
            latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(args.requests)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    report = {
        "requests": args.requests, "concurrency": args.concurrency, "seconds": round(elapsed, 2),
        "per_second": round(args.requests / elapsed, 2),
        "ms_p50": round(statistics.median(latencies), 1),
        "ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
        "ms_max": round(latencies[-1], 1), "codes": dict(codes),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
