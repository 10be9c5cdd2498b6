"""`make saturate` and `make soak`: the mesh pushed past what it can serve, and held near it for long.

    python -m scripts.saturation [--load 3.0] [--seconds 60] [--deadline-ms 2000] [--out reports/saturation.json]
    python -m scripts.saturation --soak          # --load 0.7 --seconds 1200, reports/soak.json

Starts the stack behind Envoy as `make run-mesh --plaintext-clients` does (two routers over mTLS,
harness.mesh.running_mesh), then:

1. measures what the mesh serves: `--capacity-clients` callers, each calling again as soon as it
   is answered, for `--capacity-s` seconds; capacity = answers per second;
2. calls Recognize at `--load` x that rate, open loop (a call starts on schedule whether or not
   the earlier ones were answered, as independent users do), each with `--deadline-ms`, for
   `--seconds`, on test-split photos in turn;
3. meanwhile asks Envoy every 0.5 s which routers are in rotation (admin /clusters) and whether
   their processes live, and samples every process's memory (RSS) every 10 s.

It reports every call's outcome, p50/p99 of the answered ones, calls over their deadline plus
100 ms, Envoy's health-check and outlier-ejection counters, routers out of rotation while alive,
and memory growth per hour; each acceptance rule of issue 24 §3 as a pass or fail, printed and
written to the JSON report. Exit status 1 if a rule failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from common.errors import RETRY_PUSHBACK_HEADER
from dataset.split import load_split
from harness.mesh import Mesh, running_mesh
from harness.stack import ROOT

# The outcomes a caller may see at saturation: an answer, or a refusal it can act on.
ACCEPTABLE = {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}
LATE_MARGIN_S = 0.1  # every call ends within its deadline plus this
RSS_EVERY_S = 10.0
ROTATION_EVERY_S = 0.5
# Envoy cluster counters that say a router was taken out of rotation.
EJECTION_STATS = ("outlier_detection.ejections_enforced_total", "outlier_detection.ejections_active",
                  "health_check.failure")
# Memory is flat when no process grows by more than this over the run (after warm-up).
FLAT_RSS_MB = 100.0


@dataclass
class Outcome:
    started: float      # seconds since the phase began
    seconds: float
    code: str
    pushback_ms: int | None = None


@dataclass
class Samples:
    """What the watcher saw while the load ran."""

    out_of_rotation: list[dict] = field(default_factory=list)  # a live router Envoy did not count healthy
    rotation_checks: int = 0
    rss_mb: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # process -> (seconds, MB)


def photos(count: int = 16) -> list[bytes]:
    return [p.path.read_bytes() for p in load_split() if p.split == "test"][:count]


async def _call(stub: pb_grpc.RecognitionServiceStub, image: bytes, deadline_s: float, origin: float,
                outcomes: list[Outcome]) -> None:
    started = time.monotonic()
    try:
        await stub.Recognize(pb.RecognizeRequest(image=image), timeout=deadline_s)
        outcomes.append(Outcome(started - origin, time.monotonic() - started, "OK"))
    except grpc.aio.AioRpcError as exc:
        hint = dict(exc.trailing_metadata() or ()).get(RETRY_PUSHBACK_HEADER)
        outcomes.append(Outcome(started - origin, time.monotonic() - started, exc.code().name,
                                int(hint) if hint and str(hint).isdigit() else None))


async def closed_loop(address: str, images: list[bytes], clients: int, seconds: float) -> float:
    """Answers per second with `clients` callers calling back to back (after a 3 s warm-up)."""
    outcomes: list[Outcome] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        warm_until = time.monotonic() + 3.0
        end = warm_until + seconds

        async def caller(offset: int) -> None:
            i = offset
            while time.monotonic() < end:
                await _call(stub, images[i % len(images)], 30.0, warm_until, outcomes)
                i += clients

        await asyncio.gather(*(caller(i) for i in range(clients)))
    answered = [o for o in outcomes if o.code == "OK" and o.started >= 0 and o.started + o.seconds <= seconds]
    return len(answered) / seconds


async def open_loop(address: str, images: list[bytes], rate: float, seconds: float, deadline_s: float) -> list[Outcome]:
    """Calls started at `rate` a second for `seconds`, each with its deadline, whatever the answers."""
    outcomes: list[Outcome] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        origin = time.monotonic()
        tasks, n = [], 0
        while (due := n / rate) < seconds:
            delay = origin + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_call(stub, images[n % len(images)], deadline_s, origin, outcomes)))
            n += 1
        await asyncio.gather(*tasks)
    return outcomes


def watch(mesh: Mesh, samples: Samples, stop: threading.Event) -> None:
    """Rotation every 0.5 s, memory every 10 s, until `stop`."""
    origin = next_rss = time.monotonic()
    routers = {r.address: r for r in mesh.routers}
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_rss:
            for process in mesh.processes:
                name = getattr(process, "name", "envoy")
                name = process.address if process in mesh.routers else name
                samples.rss_mb.setdefault(name, []).append((round(now - origin, 1), process.rss_mb()))
            next_rss += RSS_EVERY_S
        try:
            hosts = mesh.envoy.hosts()
        except OSError:
            hosts = {}
        samples.rotation_checks += 1
        for address, host in hosts.items():
            router = routers.get(address)
            if router is not None and router.process.poll() is None and not host["healthy"]:
                samples.out_of_rotation.append({"at_s": round(now - origin, 1), "router": address,
                                                "health_status": host["health_status"]})
        stop.wait(ROTATION_EVERY_S)


def percentile_ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def rss_growth(series: list[tuple[float, float]]) -> dict:
    """First and last sample after the first (warm-up), and the growth in MB per hour between them."""
    kept = series[1:] if len(series) > 2 else series
    (t0, first), (t1, last) = kept[0], kept[-1]
    per_hour = (last - first) / (t1 - t0) * 3600 if t1 > t0 else 0.0
    return {"first_mb": first, "last_mb": last, "max_mb": max(mb for _, mb in series),
            "growth_mb": round(last - first, 1), "growth_mb_per_hour": round(per_hour, 1)}


def judge(outcomes: list[Outcome], deadline_s: float, envoy_stats: dict[str, int], samples: Samples,
          memory: dict[str, dict]) -> dict[str, dict]:
    """Each acceptance rule: passed or not, and what was seen."""
    codes = Counter(o.code for o in outcomes)
    late = [o for o in outcomes if o.seconds > deadline_s + LATE_MARGIN_S]
    unavailable_without_hint = sum(o.code == "UNAVAILABLE" and o.pushback_ms is None for o in outcomes)
    p99 = percentile_ms([o.seconds for o in outcomes if o.code == "OK"], 0.99)
    ejected = {k: envoy_stats.get(k, 0) for k in EJECTION_STATS}
    growth = max((m["growth_mb"] for m in memory.values()), default=0.0)
    return {
        "every call OK, RESOURCE_EXHAUSTED or UNAVAILABLE with a retry hint": {
            "passed": set(codes) <= ACCEPTABLE and unavailable_without_hint == 0,
            "seen": dict(codes), "unavailable_without_hint": unavailable_without_hint},
        "no UNKNOWN or INTERNAL": {"passed": not (codes["UNKNOWN"] or codes["INTERNAL"]),
                                   "seen": {"UNKNOWN": codes["UNKNOWN"], "INTERNAL": codes["INTERNAL"]}},
        f"every call ends within its deadline + {LATE_MARGIN_S * 1000:.0f} ms": {
            "passed": not late, "late_calls": len(late),
            "slowest_ms": round(max((o.seconds for o in outcomes), default=0) * 1000, 1)},
        "p99 of answered calls under the deadline": {"passed": p99 is not None and p99 < deadline_s * 1000,
                                                     "p99_ms": p99, "deadline_ms": deadline_s * 1000},
        "no router out of rotation while alive": {
            "passed": not samples.out_of_rotation, "checks": samples.rotation_checks,
            "times_out": len(samples.out_of_rotation), "first": samples.out_of_rotation[:5]},
        "Envoy ejected no router and counted no failed health check": {
            "passed": not any(ejected.values()), "stats": ejected},
        f"memory flat (no process grew by {FLAT_RSS_MB:.0f} MB)": {"passed": growth <= FLAT_RSS_MB,
                                                                  "largest_growth_mb": growth},
    }


def run(load: float, seconds: float, deadline_s: float, capacity_clients: int, capacity_s: float,
        log_dir: Path, capacity: float | None = None, router_env: dict[str, str] | None = None) -> dict:
    images = photos()
    with running_mesh(log_dir, routers=2, plaintext_clients=True, router_env=router_env) as mesh:
        if capacity is None:
            print(f"measuring capacity: {capacity_clients} callers for {capacity_s:.0f} s ...", file=sys.stderr)
            capacity = asyncio.run(closed_loop(mesh.address, images, capacity_clients, capacity_s))
        rate = load * capacity
        print(f"capacity {capacity:.1f} answers/s; calling at {rate:.1f}/s ({load:g}x) for {seconds:.0f} s, "
              f"deadline {deadline_s * 1000:.0f} ms ...", file=sys.stderr)
        before = mesh.envoy.stats()
        samples, stop = Samples(), threading.Event()
        watcher = threading.Thread(target=watch, args=(mesh, samples, stop), daemon=True)
        watcher.start()
        started = time.monotonic()
        outcomes = asyncio.run(open_loop(mesh.address, images, rate, seconds, deadline_s))
        took = time.monotonic() - started
        stop.set()
        watcher.join(10)
        after = mesh.envoy.stats()
        envoy_stats = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
        envoy_stats["outlier_detection.ejections_active"] = after.get("outlier_detection.ejections_active", 0)
    memory = {name: rss_growth(series) for name, series in samples.rss_mb.items() if series}
    answered = [o.seconds for o in outcomes if o.code == "OK"]
    refused = [o.seconds for o in outcomes if o.code != "OK"]
    rules = judge(outcomes, deadline_s, envoy_stats, samples, memory)
    return {
        "load": load, "seconds": seconds, "deadline_ms": deadline_s * 1000, "router_env": router_env or {},
        "capacity_per_s": round(capacity, 2), "offered_per_s": round(rate, 2),
        "calls": len(outcomes), "answered_per_s": round(len(answered) / took, 2),
        "codes": dict(Counter(o.code for o in outcomes)),
        "answered_p50_ms": percentile_ms(answered, 0.5), "answered_p99_ms": percentile_ms(answered, 0.99),
        "refused_p50_ms": percentile_ms(refused, 0.5), "refused_p99_ms": percentile_ms(refused, 0.99),
        "pushback_ms_median": statistics.median([o.pushback_ms for o in outcomes if o.pushback_ms]) if any(
            o.pushback_ms for o in outcomes) else None,
        "envoy": {k: v for k, v in sorted(envoy_stats.items()) if k.startswith(
            ("outlier_detection.", "health_check.", "upstream_rq_retry", "upstream_rq_timeout",
             "upstream_rq_pending_overflow", "membership_healthy"))},
        "memory": memory,
        "rules": rules,
        "passed": all(rule["passed"] for rule in rules.values()),
    }


def print_report(report: dict) -> None:
    print(f"capacity {report['capacity_per_s']}/s, offered {report['offered_per_s']}/s for {report['seconds']:.0f} s "
          f"(deadline {report['deadline_ms']:.0f} ms): {report['calls']} calls {report['codes']}")
    print(f"answered {report['answered_per_s']}/s, p50 {report['answered_p50_ms']} ms, p99 {report['answered_p99_ms']} ms;"
          f" refused p50 {report['refused_p50_ms']} ms, p99 {report['refused_p99_ms']} ms, retry hint median "
          f"{report['pushback_ms_median']} ms")
    for name, m in report["memory"].items():
        print(f"  RSS {name:<22} {m['first_mb']:>8} -> {m['last_mb']:>8} MB ({m['growth_mb_per_hour']:+} MB/h)")
    for rule, result in report["rules"].items():
        seen = {k: v for k, v in result.items() if k != "passed"}
        print(f"  {'PASS' if result['passed'] else 'FAIL'}  {rule}: {json.dumps(seen)[:300]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.saturation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak", action="store_true", help="the soak: --load 0.7 --seconds 1200, reports/soak.json")
    parser.add_argument("--load", type=float, help="offered load as a multiple of the measured capacity (3.0)")
    parser.add_argument("--seconds", type=float, help="how long the load runs (60)")
    parser.add_argument("--deadline-ms", type=float, default=2000.0, help="every call's deadline")
    parser.add_argument("--capacity-clients", type=int, default=8, help="callers while measuring capacity")
    parser.add_argument("--capacity-s", type=float, default=15.0, help="how long capacity is measured")
    parser.add_argument("--capacity", type=float, help="skip the measurement: answers/s the mesh serves")
    parser.add_argument("--max-active", type=int, help="the routers' ROUTER_MAX_ACTIVE (0: no admission gate, "
                                                       "as before issue 24)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    load = args.load or (0.7 if args.soak else 3.0)
    seconds = args.seconds or (1200.0 if args.soak else 60.0)
    out = args.out or ROOT / "reports" / ("soak.json" if args.soak else "saturation.json")
    report = run(load, seconds, args.deadline_ms / 1000, args.capacity_clients, args.capacity_s,
                 Path(tempfile.mkdtemp(prefix="carrecog-saturation-")), args.capacity,
                 None if args.max_active is None else {"ROUTER_MAX_ACTIVE": str(args.max_active)})
    print_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
