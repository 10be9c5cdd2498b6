"""Locust load test of RecognitionService/Recognize against a running router (loopback only).

    make load                                   # 8 users, 30 s, against $ROUTER_ADDRESS (127.0.0.1:50050)
    ROUTER_ADDRESS=127.0.0.1:50050 .venv/bin/locust -f scripts/locustfile.py --headless \\
        --users 8 --spawn-rate 8 --run-time 30s --csv reports/load/load --html reports/load/load.html
    LOAD_FORCE_MODEL=global make load LOAD_USERS=1   # one model's latency (the logo stage is skipped)

Each user calls Recognize back to back (no wait: a closed loop of N concurrent
callers) with the shared test-split photos, round robin. Every call fires a
Locust request event (type "grpc", name "Recognize", its response time and
size); a failed call's exception is its gRPC status code. At the end it prints
one JSON line: throughput, exact p50/p95/p99 (Locust's own CSV rounds response
times to two significant digits) and the status codes seen.

Environment: ROUTER_ADDRESS (host:port; Locust's --host wins when given),
LOAD_FORCE_MODEL, LOAD_SKIP_LOGO=1, LOAD_TIMEOUT_S (30), LOAD_PHOTOS (64).
Locust runs on gevent: run it as its own process (make load), never inside pytest.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import threading
import time
from typing import Any

import grpc
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()  # grpc's waits yield to gevent, so users run concurrently

from locust import User, constant, events, task  # noqa: E402

from carrecog.v1 import recognition_service_pb2 as pb  # noqa: E402
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc  # noqa: E402
from common.server import DEFAULT_ROUTER_ADDRESS  # noqa: E402

DEFAULT_ADDRESS = DEFAULT_ROUTER_ADDRESS


class GrpcStatusError(Exception):
    """A failed call as Locust records it: the status code's name."""

    def __str__(self) -> str:
        return str(self.args[0])


class Outcomes:
    """Every call's latency and status code, for the summary line."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies_ms: list[float] = []
        self.codes: collections.Counter = collections.Counter()
        self.first_start: float | None = None
        self.last_end = 0.0

    def add(self, started: float, ended: float, code: str) -> None:
        with self.lock:
            self.first_start = started if self.first_start is None else min(self.first_start, started)
            self.last_end = max(self.last_end, ended)
            self.latencies_ms.append((ended - started) * 1000)
            self.codes[code] += 1

    def summary(self, users: int) -> dict[str, Any]:
        latencies = sorted(self.latencies_ms)
        seconds = (self.last_end - self.first_start) if self.first_start is not None else 0.0

        def percentile(q: float) -> float | None:  # nearest rank
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

        return {"users": users, "requests": len(latencies), "seconds": round(seconds, 2),
                "per_second": round(len(latencies) / seconds, 2) if seconds else 0.0,
                "ms_p50": percentile(0.50), "ms_p95": percentile(0.95), "ms_p99": percentile(0.99),
                "ms_max": round(latencies[-1], 1) if latencies else None, "codes": dict(self.codes)}


OUTCOMES = Outcomes()
_photos: list[bytes] = []
_next_photo = itertools.count()  # one round robin over the photos for all users


def photos() -> list[bytes]:
    """The first LOAD_PHOTOS test-split photos, read once."""
    if not _photos:
        from dataset.split import load_split

        _photos.extend(p.path.read_bytes() for p in load_split() if p.split == "test")
        del _photos[int(os.environ.get("LOAD_PHOTOS", "64")):]
    return _photos


class GrpcClient:
    """A gRPC stub whose unary calls fire Locust request events."""

    def __init__(self, stub: Any, environment: Any) -> None:
        self._stub = stub
        self._environment = environment

    def call(self, method: str, request: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        response, exception, code = None, None, "OK"
        try:
            response = getattr(self._stub, method)(request, **kwargs)
        except grpc.RpcError as exc:
            code = exc.code().name
            exception = GrpcStatusError(code)
        ended = time.perf_counter()
        OUTCOMES.add(started, ended, code)
        self._environment.events.request.fire(
            request_type="grpc", name=method, response_time=(ended - started) * 1000,
            response_length=response.ByteSize() if response is not None else 0,
            exception=exception, context={"code": code})
        return response


class RecognizeUser(User):
    wait_time = constant(0)

    def on_start(self) -> None:
        address = self.host or os.environ.get("ROUTER_ADDRESS") or DEFAULT_ADDRESS
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
        self.client = GrpcClient(pb_grpc.RecognitionServiceStub(self.channel), self.environment)
        self.options = pb.RecognizeOptions(force_model=os.environ.get("LOAD_FORCE_MODEL", ""),
                                           skip_logo=os.environ.get("LOAD_SKIP_LOGO", "") in ("1", "true", "yes"))
        self.timeout = float(os.environ.get("LOAD_TIMEOUT_S", "30"))
        self.photos = photos()

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def recognize(self) -> None:
        image = self.photos[next(_next_photo) % len(self.photos)]
        self.client.call("Recognize", pb.RecognizeRequest(image=image, options=self.options), timeout=self.timeout)


@events.quitting.add_listener
def _print_summary(environment: Any, **_: Any) -> None:
    users = environment.parsed_options.num_users if environment.parsed_options else 0
    print(json.dumps({"load": OUTCOMES.summary(users)}), flush=True)
