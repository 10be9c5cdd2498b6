"""`make bench`: what the logo stage costs, measured side by side in one run on this machine.

    python -m scripts.bench [--requests 120] [--out reports/bench.json]

Starts a model server, a logo service and one router per logo policy
(`always`, `uncertain`) on loopback, then measures, on test-split photos:

- the default model's SavedModel alone, in this process: batch-1 latency and
  batched throughput (32 photos a call), the floor under everything else; the
  served version and the one before it, in turns; with its GFLOPs per photo and
  the share of what TensorFlow sustains here on a dense 1x1 convolution;
- the router with `skip_logo` (the model behind gRPC, no logo stage);
- the router with each policy;
- the router with the default policy and `skip_localization` (the photo
  classified whole: what the localiser costs, issue 21);
- a router with the default policy and no open-set verdict
  (`ROUTER_OPEN_SET_FILE=none`: what the verdict costs, issue 22);

each at 1 and at 8 clients at a time, and prints requests/s, p50 and p95 with
the ratios to `skip_logo` and to `skip_localization`. Then the default router
against a second model server that serves the default model's previous version
(what the stack served before), in turns at 1, 2, 4 and 8 clients: the new
default against the old, drawn as throughput against clients in a PNG beside
the JSON report (issue 25).
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
from harness.stack import ROOT, SERVING_MODELS, start_logo_service, start_model_server, start_router
from dataset.split import load_split
from scripts.bench_plot import clients_png

POLICIES = ("always", "uncertain")
CLIENT_LEVELS = (1, 2, 4, 8)  # the new and the previous default, side by side


def default_versions() -> list[Path]:
    """The default model's version folders, newest last: the served one and the ones it replaced."""
    return sorted((p for p in (SERVING_MODELS / DEFAULT_GLOBAL_MODEL).iterdir() if p.name.isdigit()),
                  key=lambda p: int(p.name))


def previous_default_models(out_dir: Path) -> Path:
    """serving_models as symlinks, the default model without its newest version: what the stack served
    before it (TF Serving and the model server serve a model's highest version)."""
    root = out_dir / "previous_models"
    (root / DEFAULT_GLOBAL_MODEL).mkdir(parents=True)
    for entry in SERVING_MODELS.iterdir():
        if entry.name != DEFAULT_GLOBAL_MODEL:
            (root / entry.name).symlink_to(entry.resolve())
    for version in default_versions()[:-1]:
        (root / DEFAULT_GLOBAL_MODEL / version.name).symlink_to(version.resolve())
    return root


def test_photos(limit: int = 96) -> list[bytes]:
    """The first `limit` test-split photos, as uploaded: what every benchmark here sends."""
    return [p.path.read_bytes() for p in load_split() if p.split == "test"][:limit]


def saved_model_alone(photos: list[bytes], requests: int, versions: list[Path]) -> dict:
    """Batch-1 p50 and batched throughput of each version, measured in turns (one round each, then
    again), so the versions see the same machine load; with the hardware's share each reaches."""
    import tensorflow as tf

    serves = {v.name: tf.saved_model.load(str(v)).signatures["serving_default"] for v in versions}
    latencies: dict[str, list[float]] = {name: [] for name in serves}
    batched: dict[str, list[float]] = {name: [] for name in serves}
    for serve in serves.values():
        serve(image_bytes=tf.constant(photos[:1]))  # trace and warm
        serve(image_bytes=tf.constant(photos[:32]))
    for round_ in range(2):
        for name, serve in serves.items():
            for i in range(requests // 2):
                started = time.perf_counter()
                serve(image_bytes=tf.constant([photos[(round_ * requests + i) % len(photos)]]))
                latencies[name].append((time.perf_counter() - started) * 1000)
            batches = max(1, requests // 64)
            started = time.perf_counter()
            for b in range(batches):
                serve(image_bytes=tf.constant([photos[(b * 32 + j) % len(photos)] for j in range(32)]))
            batched[name].append(batches * 32 / (time.perf_counter() - started))
    limit = hardware_limit()
    report = {"hardware": limit, "versions": {}}
    for version in versions:
        gflops = arithmetic(version)["gflops_per_photo"]
        p50, per_second = statistics.median(latencies[version.name]), statistics.mean(batched[version.name])
        report["versions"][version.name] = {
            "batch1_ms_p50": round(p50, 1), "batched_images_per_second": round(per_second, 1),
            "arithmetic": arithmetic(version),
            "share_of_conv_limit_batched": round(per_second * gflops / limit["conv1x1_gflops_per_s"], 3),
            "share_of_conv_limit_batch1": round(gflops / (p50 / 1000) / limit["conv1x1_gflops_per_s"], 3)}
    return report


def arithmetic(version: Path) -> dict:
    """GFLOPs per photo (2 x the convolutions' and heads' multiply-adds, training.lite_arch) of an
    EfficientNet-Lite version: its shared bottom, each member's blocks and head; a cascade's second
    member counted at the share of test photos that needed it (its card)."""
    from training.lite_arch import multiply_adds
    from training.lite_savedmodel import member_cuts

    card = json.loads((version / "model_card.json").read_text())
    size = card["input_size"][0]
    classes = card["signatures"]["serving_default"]["num_classes"]
    if "members" in card.get("training", {}):
        variant, cuts = member_cuts(card)
    else:  # one network fine-tuned from its stem (training.lite_import)
        variant, cuts = "lite" + card["architecture"].split("EfficientNet-Lite", 1)[1][0], [0]
    low = min(cuts)
    bottom = multiply_adds(variant, size, 0, low)["total"] if low else 0
    members = [multiply_adds(variant, size, low, None, classes=classes)["total"] for _ in cuts]
    share = card.get("cascade", {}).get("test", {}).get("second_member_share")
    weights = [1.0] + [share if share is not None else 1.0] * (len(members) - 1)
    total = bottom + sum(w * m for w, m in zip(weights, members))
    return {"gflops_per_photo": round(2 * total / 1e9, 3), "members": len(members),
            "second_member_share": share, "how": "2 x multiply-adds of convolutions and heads (training.lite_arch)"}


def hardware_limit() -> dict:
    """What TensorFlow sustains here on the same kind of work: the best of 5 timings of a 1x1
    convolution shaped like Lite0's middle blocks, and of a 1024^3 matmul (float32)."""
    import tensorflow as tf

    def best_rate(fn, flops: float) -> float:
        fn()
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return round(flops / min(times) / 1e9, 1)

    x, w = tf.random.normal([32, 40, 40, 240]), tf.random.normal([1, 1, 240, 480])
    a, b = tf.random.normal([1024, 1024]), tf.random.normal([1024, 1024])
    conv = tf.function(lambda: tf.nn.conv2d(x, w, 1, "SAME"))
    matmul = tf.function(lambda: tf.matmul(a, b))
    return {"conv1x1_gflops_per_s": best_rate(lambda: conv().numpy(), 2 * 32 * 40 * 40 * 240 * 480),
            "matmul_gflops_per_s": best_rate(lambda: matmul().numpy(), 2 * 1024**3)}


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
    photos = test_photos()
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
        # The default policy without the open-set verdict: what the verdict costs (issue 22).
        routers["no_verdict"] = start_router(models.address, logo.address, log_dir / "no_verdict",
                                             env={"ROUTER_LOGO_POLICY": "uncertain", "ROUTER_OPEN_SET_FILE": "none"})
        services.append(routers["no_verdict"])
        # The same default router against the previous default version (issue 25: old and new side by side).
        if len(default_versions()) > 1:
            previous_models = start_model_server(log_dir / "previous", models=previous_default_models(log_dir))
            services.append(previous_models)
            routers["previous"] = start_router(previous_models.address, logo.address, log_dir / "previous_router",
                                               env={"ROUTER_LOGO_POLICY": "uncertain"})
            services.append(routers["previous"])
        for service in services:
            service.wait_healthy()
        report = {"saved_model_alone": saved_model_alone(photos, requests, default_versions()[-2:]), "router": {}}
        for clients in (1, 8):
            n = requests if clients == 1 else 2 * requests
            rows = {"skip_logo": load(routers["uncertain"].address, photos, n, clients, skip_logo=True),
                    "skip_localization": load(routers["uncertain"].address, photos, n, clients,
                                              skip_localization=True)}
            for policy in POLICIES:
                rows[policy] = load(routers[policy].address, photos, n, clients)
            rows["uncertain_without_verdict"] = load(routers["no_verdict"].address, photos, n, clients)
            rows["uncertain"]["p50_vs_without_verdict"] = round(
                rows["uncertain"]["ms_p50"] / rows["uncertain_without_verdict"]["ms_p50"], 2)
            base, whole = rows["skip_logo"], rows["skip_localization"]
            for row in rows.values():
                row["throughput_vs_skip_logo"] = round(row["per_second"] / base["per_second"], 2)
                row["p50_vs_skip_logo"] = round(row["ms_p50"] / base["ms_p50"], 2)
                row["throughput_vs_skip_localization"] = round(row["per_second"] / whole["per_second"], 2)
                row["p50_vs_skip_localization"] = round(row["ms_p50"] / whole["ms_p50"], 2)
            report["router"][f"{clients} client{'s' if clients > 1 else ''}"] = rows
        if "previous" in routers:
            report["new_vs_previous_default"] = new_vs_previous(routers["uncertain"].address,
                                                                routers["previous"].address, photos, requests)
        return report
    finally:
        for service in reversed(services):
            service.stop()


def new_vs_previous(new: str, previous: str, photos: list[bytes], requests: int) -> dict:
    """The default router on the served default and on the previous version, in turns at each client level."""
    versions = [int(v.name) for v in default_versions()[-2:]]
    levels = {}
    for clients in CLIENT_LEVELS:
        n = requests * max(1, clients // 4 + 1)
        previous_row, new_row = load(previous, photos, n, clients), load(new, photos, n, clients)
        levels[str(clients)] = {"previous": previous_row, "new": new_row,
                                "throughput_new_vs_previous": round(new_row["per_second"] / previous_row["per_second"], 2),
                                "p50_new_vs_previous": round(new_row["ms_p50"] / previous_row["ms_p50"], 2)}
    return {"previous_version": versions[0], "new_version": versions[-1], "policy": "uncertain", "clients": levels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=120, help="calls per measurement at 1 client (x2 at 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench.json")
    args = parser.parse_args(argv)
    report = run(args.requests, Path(tempfile.mkdtemp(prefix="carrecog-bench-")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    alone = report["saved_model_alone"]
    print(f"hardware here (TensorFlow, float32): 1x1 conv {alone['hardware']['conv1x1_gflops_per_s']} GFLOP/s, "
          f"matmul {alone['hardware']['matmul_gflops_per_s']} GFLOP/s")
    for version, row in alone["versions"].items():
        print(f"SavedModel alone ({DEFAULT_GLOBAL_MODEL}/{version}, in-process): batch 1 p50 {row['batch1_ms_p50']} ms, "
              f"batched {row['batched_images_per_second']} images/s, {row['arithmetic']['gflops_per_photo']} GFLOPs "
              f"a photo: {row['share_of_conv_limit_batched']:.0%} of the conv limit batched, "
              f"{row['share_of_conv_limit_batch1']:.0%} at batch 1")
    print(f"{'router':17s} {'clients':>7s} {'req/s':>7s} {'p50 ms':>7s} {'p95 ms':>7s} {'req/s vs skip_logo':>18s} "
          f"{'p50 vs skip_logo':>16s} {'req/s vs whole':>14s} {'p50 vs whole':>12s} {'failures':>8s}")
    for clients, rows in report["router"].items():
        for name, row in rows.items():
            print(f"{name:17s} {clients.split()[0]:>7s} {row['per_second']:7.1f} {row['ms_p50']:7.1f} "
                  f"{row['ms_p95']:7.1f} {row['throughput_vs_skip_logo']:18.2f} {row['p50_vs_skip_logo']:16.2f} "
                  f"{row['throughput_vs_skip_localization']:14.2f} {row['p50_vs_skip_localization']:12.2f} "
                  f"{row['failures']:8d}")
    compared = report.get("new_vs_previous_default")
    if compared is None:
        print(f"wrote {args.out} ({DEFAULT_GLOBAL_MODEL} has one version: no previous default to compare)",
              file=sys.stderr)
        return 0
    print(f"default router, {DEFAULT_GLOBAL_MODEL} v{compared['new_version']} against v{compared['previous_version']} "
          "(the same router, its own model server):")
    for clients, row in compared["clients"].items():
        print(f"  {clients} clients: {row['new']['per_second']:.1f} against {row['previous']['per_second']:.1f} req/s "
              f"({row['throughput_new_vs_previous']:.2f}x), p50 {row['new']['ms_p50']:.1f} against "
              f"{row['previous']['ms_p50']:.1f} ms ({row['p50_new_vs_previous']:.2f}x)")
    plot = args.out.with_name(args.out.stem + "_clients.png")
    clients_png(compared, plot)
    print(f"wrote {args.out} and {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
