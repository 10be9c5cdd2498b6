"""`make bench`: what the logo stage costs, measured side by side in one run on this machine.

    python -m scripts.bench [--requests 120] [--out reports/bench.json]

Starts a model server, a logo service and one router per logo policy
(`always`, `uncertain`) on loopback, then measures, on test-split photos:

- the default model's SavedModel alone, in this process: batch-1 latency and
  batched throughput (32 photos a call), the floor under everything else;
- the router with `skip_logo` (the model behind gRPC, no logo stage);
- the router with each policy;

each at 1 and at 8 clients at a time, and prints requests/s, p50 and p95 with
the ratios to `skip_logo`. Writes the JSON report.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from router_service.settings import DEFAULT_GLOBAL_MODEL
from scripts.stack import ROOT, SERVING_MODELS, start_logo_service, start_model_server, start_router
from training.split import load_split

POLICIES = ("always", "uncertain")


def saved_model_alone(photos: list[bytes], requests: int) -> dict:
    import tensorflow as tf

    versions = [p for p in (SERVING_MODELS / DEFAULT_GLOBAL_MODEL).iterdir() if p.name.isdigit()]
    serve = tf.saved_model.load(str(max(versions, key=lambda p: int(p.name)))).signatures["serving_default"]
    serve(image_bytes=tf.constant(photos[:1]))  # trace and warm
    latencies = []
    for i in range(requests):
        started = time.perf_counter()
        serve(image_bytes=tf.constant([photos[i % len(photos)]]))
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    batches = max(1, requests // 32)
    for b in range(batches):
        serve(image_bytes=tf.constant([photos[(b * 32 + j) % len(photos)] for j in range(32)]))
    return {"batch1_ms_p50": round(statistics.median(latencies), 1),
            "batched_images_per_second": round(batches * 32 / (time.perf_counter() - started), 1)}


def load(address: str, photos: list[bytes], requests: int, clients: int, **options) -> dict:
    latencies, failures = [], 0
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        request_options = pb.RecognizeOptions(**options)

        def one(i: int) -> None:
            nonlocal failures
            started = time.perf_counter()
            try:
                stub.Recognize(pb.RecognizeRequest(image=photos[i % len(photos)], options=request_options), timeout=60)
            except grpc.RpcError:
                failures += 1
            latencies.append((time.perf_counter() - started) * 1000)

        for i in range(min(8, requests)):  # warm the connection and the model's batch sizes
            one(i)
        latencies.clear()
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(requests)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"per_second": round(requests / elapsed, 2), "ms_p50": round(statistics.median(latencies), 1),
            "ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1), "failures": failures}


def run(requests: int, log_dir: Path) -> dict:
    photos = [p.path.read_bytes() for p in load_split() if p.split == "test"][:96]
    services = []
    try:
        models = start_model_server(log_dir)
        logo = start_logo_service(log_dir)
        services += [models, logo]
        routers = {}
        for policy in POLICIES:
            routers[policy] = start_router(models.address, logo.address, log_dir / policy,
                                           env={"ROUTER_LOGO_POLICY": policy})
            services.append(routers[policy])
        for service in services:
            service.wait_healthy()
        report = {"saved_model_alone": saved_model_alone(photos, requests), "router": {}}
        for clients in (1, 8):
            n = requests if clients == 1 else 2 * requests
            rows = {"skip_logo": load(routers["uncertain"].address, photos, n, clients, skip_logo=True)}
            for policy in POLICIES:
                rows[policy] = load(routers[policy].address, photos, n, clients)
            base = rows["skip_logo"]
            for row in rows.values():
                row["throughput_vs_skip_logo"] = round(row["per_second"] / base["per_second"], 2)
                row["p50_vs_skip_logo"] = round(row["ms_p50"] / base["ms_p50"], 2)
            report["router"][f"{clients} client{'s' if clients > 1 else ''}"] = rows
        return report
    finally:
        for service in reversed(services):
            service.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=120, help="calls per measurement at 1 client (x2 at 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    args = parser.parse_args(argv)
    report = run(args.requests, Path(tempfile.mkdtemp(prefix="carrecog-bench-")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    alone = report["saved_model_alone"]
    print(f"SavedModel alone ({DEFAULT_GLOBAL_MODEL}, in-process): batch 1 p50 {alone['batch1_ms_p50']} ms, "
          f"batched {alone['batched_images_per_second']} images/s")
    print(f"{'router':12s} {'clients':>7s} {'req/s':>7s} {'p50 ms':>7s} {'p95 ms':>7s} {'req/s vs skip':>13s} "
          f"{'p50 vs skip':>11s} {'failures':>8s}")
    for clients, rows in report["router"].items():
        for name, row in rows.items():
            print(f"{name:12s} {clients.split()[0]:>7s} {row['per_second']:7.1f} {row['ms_p50']:7.1f} "
                  f"{row['ms_p95']:7.1f} {row['throughput_vs_skip_logo']:13.2f} {row['p50_vs_skip_logo']:11.2f} "
                  f"{row['failures']:8d}")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
