"""Prometheus metrics of every carrecog service, in one place.

GrpcServer serves them over HTTP at /metrics (`<PREFIX>_METRICS_PORT`) and hands
`RPC_METRICS` to the shared ServiceInterceptor, which reports each call's start,
its answers and its final status code (the one it logs), so nothing re-derives
codes. Names follow go-grpc-prometheus / py-grpc-prometheus, whose sync
interceptors the aio server refuses:

- grpc_server_started_total{grpc_type,grpc_service,grpc_method}
- grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
  (calls refused by the concurrency limit count as handled with RESOURCE_EXHAUSTED)
- grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method} (histogram)
- carrecog_grpc_server_in_flight{grpc_service,grpc_method} (gauge)

and the domain's own, read from the answers a service sends (RESPONSE_OBSERVERS):

- carrecog_router_answers_total{route,fallback_reason} (route as the client prints it)
- carrecog_router_stage_seconds{stage} (histogram; logo, predict, total from the answer's timings)
- carrecog_logo_gate_total{brand,fired} (the best candidate's brand, "none" without one)
- carrecog_model_server_batch_size{model} (histogram; model_server/batch_scheduler.py)

Health checks and reflection are not counted (ServiceInterceptor does not wrap them).
Each service is one process, so the default registry holds one service's metrics.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

logger = logging.getLogger("carrecog.metrics")
disable_created_metrics()  # no *_created series: half the lines, nothing a dashboard uses

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", RPC_LABELS)
HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, regardless of success or failure.",
                  (*RPC_LABELS, "grpc_code"))
HANDLING = Histogram("grpc_server_handling_seconds",
                     "Response latency (seconds) of gRPC calls handled by the server.", RPC_LABELS,
                     buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("carrecog_grpc_server_in_flight", "RPCs being handled now (health checks excluded).",
                  ("grpc_service", "grpc_method"))

ROUTER_ANSWERS = Counter("carrecog_router_answers_total", "Recognitions answered, by route and fallback reason.",
                         ("route", "fallback_reason"))
ROUTER_STAGE = Histogram("carrecog_router_stage_seconds",
                         "Time of each stage of a recognition (the answer's timings).", ("stage",),
                         buckets=LATENCY_BUCKETS)
LOGO_GATE = Counter("carrecog_logo_gate_total", "MatchLogo answers: did the gate fire, for which best brand.",
                    ("brand", "fired"))
BATCH_SIZE = Histogram("carrecog_model_server_batch_size", "Rows in each batch the model server ran (before padding).",
                       ("model",), buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))


def split_method(method: str) -> tuple[str, str]:
    """"/pkg.Service/Method" -> ("pkg.Service", "Method")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _enum_name(message: Any, field: str, prefix: str) -> str:
    """An enum field's value name without its prefix, lower case: ROUTE_BRAND_MODEL -> brand_model."""
    value = getattr(message, field)
    enum = message.DESCRIPTOR.fields_by_name[field].enum_type.values_by_number.get(value)
    name = enum.name if enum is not None else str(value)
    return name.removeprefix(prefix).lower()


def observe_recognition(response: Any) -> None:
    """One RecognizeResponse: its route (and fallback reason) and its stage timings."""
    reason = _enum_name(response, "fallback_reason", "FALLBACK_REASON_")
    ROUTER_ANSWERS.labels(_enum_name(response, "route", "ROUTE_"),
                          "none" if reason == "unspecified" else reason).inc()
    for timing in response.timings:
        stage = timing.stage.split(":", 1)[0]  # "predict:<model>" -> predict
        ROUTER_STAGE.labels(stage).observe(timing.ms / 1000)


def _observe_batch(response: Any) -> None:
    for result in response.results:
        if result.HasField("response"):
            observe_recognition(result.response)


def _observe_stream_item(response: Any) -> None:
    if response.result.HasField("response"):
        observe_recognition(response.result.response)


def observe_logo_match(response: Any) -> None:
    brand = response.best.brand if response.HasField("best") and response.best.brand else "none"
    LOGO_GATE.labels(brand, "true" if response.matched else "false").inc()


# Domain metrics, read from each answer a method sends (duck-typed: common/ imports no service's stubs).
RESPONSE_OBSERVERS: dict[str, Callable[[Any], None]] = {
    "/carrecog.v1.RecognitionService/Recognize": observe_recognition,
    "/carrecog.v1.RecognitionService/RecognizeBatch": _observe_batch,
    "/carrecog.v1.RecognitionService/RecognizeStream": _observe_stream_item,
    "/carrecog.v1.LogoService/MatchLogo": observe_logo_match,
}


class RpcMetrics:
    """What ServiceInterceptor reports about each call (see common.interceptors)."""

    def started(self, method: str, grpc_type: str) -> None:
        service, name = split_method(method)
        STARTED.labels(grpc_type, service, name).inc()
        IN_FLIGHT.labels(service, name).inc()

    def response(self, method: str, message: Any) -> None:
        observer = RESPONSE_OBSERVERS.get(method)
        if observer is None:
            return
        try:
            observer(message)
        except Exception:  # a metric must never fail a call
            logger.debug("response metrics failed for %s", method, exc_info=True)

    def handled(self, method: str, grpc_type: str, code: str, seconds: float) -> None:
        service, name = split_method(method)
        IN_FLIGHT.labels(service, name).dec()
        HANDLED.labels(grpc_type, service, name, code).inc()
        HANDLING.labels(grpc_type, service, name).observe(seconds)


RPC_METRICS = RpcMetrics()


def observe_batch_size(model: str, rows: int) -> None:
    BATCH_SIZE.labels(model).observe(rows)


class MetricsServer:
    """Prometheus' text format over HTTP at /metrics (any path answers), on a daemon thread."""

    def __init__(self, host: str, port: int) -> None:
        self.httpd, self.thread = start_http_server(port, addr=host)
        self.port = int(self.httpd.server_port)

    def close(self) -> None:
        """Stop serving (blocks up to half a second: run it off the event loop)."""
        self.httpd.shutdown()
        self.httpd.server_close()
