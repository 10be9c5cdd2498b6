"""OpenTelemetry tracing, on when OTEL_EXPORTER_OTLP_ENDPOINT is set (read once, at start).

Every carrecog server gets OpenTelemetry's aio server interceptor (GrpcServer)
and the router's downstream channels its aio client interceptors
(common.channels.downstream_channel), so one trace runs client -> router ->
logo service and model server: the W3C `traceparent` travels in the gRPC
metadata. Spans go to the OTLP/gRPC exporter, which reads the standard
OTEL_EXPORTER_OTLP_* variables (endpoint, headers, certificates, insecure);
the service name is OTEL_SERVICE_NAME, else `carrecog-<service>`. Health checks
are not traced.

Tests install their own provider (e.g. with an InMemorySpanExporter) with
`configure(provider)`.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from common.logs import log_event

logger = logging.getLogger("carrecog.tracing")

_UNSET: Any = object()
_provider: Any = _UNSET  # the process's TracerProvider, None = tracing off


def configure(provider: Any) -> Any:
    """Use this TracerProvider (None: tracing off) instead of the one from the environment;
    returns what was there, to be put back with configure() again."""
    global _provider
    previous, _provider = _provider, provider
    return previous


def init(service: str) -> Any:
    """The process's TracerProvider, built once from the environment; None when tracing is off."""
    global _provider
    if _provider is _UNSET:
        _provider = _from_environment(service)
    return _provider


def current() -> Any:
    """The TracerProvider set up by init() or configure(), or None."""
    return None if _provider is _UNSET else _provider


def _from_environment(service: str) -> Any:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as exc:  # the exporter is the one optional piece
        log_event(logger, "tracing off: the OTLP exporter cannot be imported", logging.WARNING, error=str(exc))
        return None
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"carrecog-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))  # shuts down (flushes) at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log_event(logger, "tracing on", endpoint=endpoint)
    return provider


def server_interceptors(provider: Any) -> list:
    """OpenTelemetry's aio server interceptor (health checks and reflection left out); [] when tracing is off."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    untraced = filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection."))
    return [aio_server_interceptor(tracer_provider=provider, filter_=filters.negate(untraced))]


def client_interceptors(provider: Any) -> list:
    """OpenTelemetry's aio client interceptors (they inject `traceparent`); [] when tracing is off."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=provider))
