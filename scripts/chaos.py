"""`make test-chaos`: faults under load against the real services, on loopback, bounded in time.

    python -m scripts.chaos [--clients 4] [--phase-s 10] [--out reports/chaos.json]

Starts the three services the way `make run` does (harness/supervisor.py
restarts one that dies; the router with the `always` logo policy, so every
call depends on the logo service), keeps `--clients` callers sending photos to the
router and one caller asking its health every 100 ms, and goes through the
phases below, each `--phase-s` long:

    baseline            nothing wrong
    logo killed         SIGKILL; the supervisor restarts it
    logo hung           SIGSTOP for the phase, then SIGCONT
    model server killed SIGKILL; the supervisor restarts it (it reloads its models)
    router restarted    SIGTERM (graceful), restarted by the supervisor

For each phase it reports calls, failures by status code, degraded answers by
fallback reason, p50/p99 latency, slow calls (over the logo timeout) and, for
a restarted service, how long after it was SERVING again the router answered
normally. Memory (RSS) of each service before and after, health answers
under load, and every UNKNOWN / INTERNAL status in the clients' view or the
services' logs are reported too. Prints a table; writes the JSON report.
"""
from __future__ import annotations

import argparse
import json
import signal
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
from common import healthcheck
from common.data import data_dir
from harness.stack import ROOT, ServiceProcess, free_port, start_logo_service, start_model_server, start_router
from harness.supervisor import Supervisor

LOGO_TIMEOUT_MS = 1500  # the router's default; "slow" calls are those that waited for it
PHOTO_IDS = ["00274", "01752", "03205", "00001", "00013", "00160", "00002", "00003"]


@dataclass
class Call:
    started: float
    seconds: float
    code: str
    fallback: str = ""


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    health: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)



def caller(address: str, photos: list[bytes], recorder: Recorder, stop: threading.Event, offset: int) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        i = offset
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = stub.Recognize(pb.RecognizeRequest(image=photos[i % len(photos)]), timeout=10)
                fallback = pb.FallbackReason.Name(reply.fallback_reason) if reply.fallback_reason else ""
                recorder.add(Call(started, time.monotonic() - started, "OK", fallback))
            except grpc.RpcError as exc:
                recorder.add(Call(started, time.monotonic() - started, exc.code().name))
                time.sleep(0.05)  # a refused call returns at once: do not spin
            i += 1


def health_prober(address: str, recorder: Recorder, stop: threading.Event) -> None:
    while not stop.is_set():
        recorder.health.append((time.monotonic(), healthcheck.status(address, timeout=1.0)))
        time.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)


def summarize(name: str, calls: list[Call], health: list[str], recovered_after_s: float | None = None) -> dict:
    seconds = [c.seconds for c in calls if c.code == "OK"]
    return {
        "phase": name,
        "calls": len(calls),
        "failed": dict(Counter(c.code for c in calls if c.code != "OK")),
        "degraded": dict(Counter(c.fallback for c in calls if c.code == "OK" and c.fallback)),
        "p50_ms": percentile(seconds, 0.50),
        "p99_ms": percentile(seconds, 0.99),
        "slow_calls": sum(s >= LOGO_TIMEOUT_MS / 1000 for s in seconds),
        "recovered_after_s": recovered_after_s,
        "health": dict(Counter(health)),
    }


def wait_serving(service: ServiceProcess, supervisor: Supervisor, timeout: float = 180) -> float:
    """Keep the supervisor restarting until `service`'s successor is SERVING; returns that moment."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        supervisor.check()
        current = supervisor.entries[service.name].service
        if current.process.poll() is None and current.health() == "SERVING":
            return time.monotonic()
        time.sleep(0.1)
    raise TimeoutError(f"{service.name} not SERVING again within {timeout:.0f} s")


def first_normal_answer_after(recorder: Recorder, moment: float, timeout: float = 30) -> float | None:
    """Seconds from `moment` to the start of the first call answered OK without a fallback."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with recorder.lock:
            done = [c for c in recorder.calls if c.started + c.seconds >= moment and c.code == "OK" and not c.fallback]
        if done:
            return round(max(0.0, min(c.started + c.seconds for c in done) - moment), 2)
        time.sleep(0.1)
    return None


def log_codes(services: list[ServiceProcess], codes: tuple[str, ...] = ("UNKNOWN", "INTERNAL")) -> dict[str, int]:
    found: Counter = Counter()
    for service in services:
        for line in service.log_path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                found["non-JSON log line"] += 1
                continue
            if entry.get("code") in codes:
                found[f"{service.name}:{entry['code']}"] += 1
    return dict(found)


def run(clients: int, phase_s: float, log_dir: Path) -> dict:
    photos = [(data_dir() / "stanford_cars" / "images" / f"{i}.jpg").read_bytes() for i in PHOTO_IDS]
    supervisor = Supervisor(min_backoff_s=0.5)
    recorder, stop = Recorder(), threading.Event()
    workers: list[threading.Thread] = []
    phases, memory = [], {}
    try:
        models = supervisor.add(lambda p: start_model_server(log_dir, p), free_port())
        logo = supervisor.add(lambda p: start_logo_service(log_dir, p), free_port())
        router = supervisor.add(lambda p: start_router(models.address, logo.address, log_dir, p,
                                                       env={"ROUTER_LOGO_POLICY": "always"}), free_port())
        for service in supervisor.services:
            service.wait_healthy()
        memory["before"] = {s.name: s.rss_mb() for s in supervisor.services}
        workers = [threading.Thread(target=caller, args=(router.address, photos, recorder, stop, i), daemon=True)
                   for i in range(clients)]
        workers.append(threading.Thread(target=health_prober, args=(router.address, recorder, stop), daemon=True))
        for worker in workers:
            worker.start()

        def phase(name: str, fault, restore=None) -> None:
            begin = time.monotonic()
            target = fault()
            time.sleep(phase_s)
            recovered = None
            if restore is not None:
                back = restore(target)
                recovered = first_normal_answer_after(recorder, back)
            end = time.monotonic()
            with recorder.lock:
                calls = [c for c in recorder.calls if begin <= c.started < end]
            health = [status for at, status in list(recorder.health) if begin <= at < end]
            phases.append(summarize(name, calls, health, recovered))
            print(json.dumps(phases[-1]), file=sys.stderr, flush=True)

        def kill(name: str, sig: int):
            def fault() -> ServiceProcess:
                service = supervisor.entries[name].service
                service.process.send_signal(sig)
                return service
            return fault

        def restarted(service: ServiceProcess) -> float:
            return wait_serving(service, supervisor)

        def resumed(service: ServiceProcess) -> float:
            service.process.send_signal(signal.SIGCONT)
            return time.monotonic()

        phase("baseline", lambda: None)
        phase("logo killed", kill("logo_service", signal.SIGKILL), restarted)
        phase("logo hung", kill("logo_service", signal.SIGSTOP), resumed)
        phase("model server killed", kill("model_server", signal.SIGKILL), restarted)
        phase("router restarted", kill("router", signal.SIGTERM), restarted)
        phase("after", lambda: None)
        memory["after"] = {s.name: s.rss_mb() for s in supervisor.services}
    finally:
        stop.set()
        for worker in workers:
            worker.join(15)
        supervisor.stop_all(signal.SIGKILL)
    return {
        "clients": clients, "phase_seconds": phase_s, "phases": phases, "memory_rss_mb": memory,
        "unknown_or_internal": {**{f"client:{c.code}": 1 for c in recorder.calls if c.code in ("UNKNOWN", "INTERNAL")},
                                **log_codes(supervisor.services)},
        "logs": str(log_dir),
    }


def print_table(report: dict) -> None:
    print(f"{'phase':22s} {'calls':>6s} {'failed':>24s} {'degraded':>44s} {'p50 ms':>8s} {'p99 ms':>8s} "
          f"{'slow':>5s} {'recovered s':>11s}  router health answers")
    for p in report["phases"]:
        failed = ", ".join(f"{k} {v}" for k, v in p["failed"].items()) or "0"
        degraded = ", ".join(f"{k.removeprefix('FALLBACK_REASON_')} {v}" for k, v in p["degraded"].items()) or "0"
        recovered = "" if p["recovered_after_s"] is None else str(p["recovered_after_s"])
        print(f"{p['phase']:22s} {p['calls']:6d} {failed:>24s} {degraded:>44s} {p['p50_ms']:8.1f} {p['p99_ms']:8.1f} "
              f"{p['slow_calls']:5d} {recovered:>11s}  {p['health']}")
    print(f"memory RSS MB before {report['memory_rss_mb'].get('before')} after {report['memory_rss_mb'].get('after')}")
    print(f"UNKNOWN / INTERNAL anywhere: {report['unknown_or_internal'] or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--phase-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "chaos.json")
    args = parser.parse_args(argv)
    report = run(args.clients, args.phase_s, Path(tempfile.mkdtemp(prefix="carrecog-chaos-")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
