"""One trace from client to router to logo service and model server (OpenTelemetry, common.tracing).

The three real services run in this test's process, each behind the shared
GrpcServer, with one in-memory span exporter standing in for OTLP: the router
is its production `serve()` (so its downstream channels are the production
ones), the logo service and the model server are their real servicers (the
cached SIFT gallery; efficientnet_lite0 loaded in-process). The spans must
form one tree: client -> router server span -> router's client spans ->
logo and model server spans, linked by the `traceparent` sent in metadata.
"""
from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from carrecog.v1 import logo_service_pb2_grpc
from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from common import tracing
from common.server import GrpcServer, ServerSettings
from harness.stack import SERVING_MODELS

pytestmark = pytest.mark.integration

RECOGNIZE = "/carrecog.v1.RecognitionService/Recognize"
MATCH_LOGO = "/carrecog.v1.LogoService/MatchLogo"
PREDICT = "/tensorflow.serving.PredictionService/Predict"


async def _start_logo(executor: ThreadPoolExecutor) -> GrpcServer:
    from logo_service.server import SERVICE_NAME, LogoServicer, load_matcher
    from logo_service.settings import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = settings_from_args(parser.parse_args([]))
    servicer = LogoServicer(settings, executor)
    servicer.matcher = await asyncio.get_running_loop().run_in_executor(executor, load_matcher, settings)
    server = GrpcServer("logo", ServerSettings(), [SERVICE_NAME])
    logo_service_pb2_grpc.add_LogoServiceServicer_to_server(servicer, server.server)
    await server.start()
    return server


async def _start_model_server(executor: ThreadPoolExecutor) -> GrpcServer:
    from model_server.config import load_model_server_config, only_models, parse_prefix_map, plan_models
    from model_server.repository import ModelRepository
    from model_server.servicer import MODEL_SERVICE, PREDICTION_SERVICE, add_servicers

    config = only_models(load_model_server_config(SERVING_MODELS / "models.config"), ["efficientnet_lite0"])
    repository = ModelRepository(plan_models(config, parse_prefix_map([f"/models={SERVING_MODELS}"])))
    await asyncio.get_running_loop().run_in_executor(executor, repository.load_all)
    server = GrpcServer("model_server", ServerSettings(), [PREDICTION_SERVICE, MODEL_SERVICE])
    add_servicers(server.server, repository, executor)
    await server.start()
    return server


async def _scenario(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, provider: TracerProvider,
                    image: bytes) -> pb.RecognizeResponse:
    import router_service.server as router_server
    from router_service.settings import parse_settings

    executor = ThreadPoolExecutor(4)
    logo = await _start_logo(executor)
    model = await _start_model_server(executor)
    routers: list[GrpcServer] = []

    class RecordedServer(GrpcServer):  # the router's own server, so the test can stop it
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            routers.append(self)

    monkeypatch.setattr(router_server, "GrpcServer", RecordedServer)
    port_file = tmp_path / "router.port"
    settings = parse_settings([
        "--model-server", f"127.0.0.1:{model.port}", "--logo-service", f"127.0.0.1:{logo.port}",
        "--port", "0", "--port-file", str(port_file), "--metrics-port", "-1", "--extra-models", "",
        "--grace-seconds", "0", "--health-interval-s", "0.2", "--logo-timeout-ms", "30000",
        "--logo-policy", "always"])
    router = asyncio.create_task(router_server.serve(settings))
    try:
        while not port_file.exists():
            if router.done():
                router.result()  # it failed to start: raise why
            await asyncio.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text()}"
        async with grpc.aio.insecure_channel(address) as plain:  # health: untraced, as everywhere
            health = health_pb2_grpc.HealthStub(plain)
            while (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status != \
                    health_pb2.HealthCheckResponse.SERVING:  # until the router has discovered its models
                await asyncio.sleep(0.2)
        async with grpc.aio.insecure_channel(address, interceptors=tracing.client_interceptors(provider)) as channel:
            return await pb_grpc.RecognitionServiceStub(channel).Recognize(pb.RecognizeRequest(image=image), timeout=60)
    finally:
        if routers:
            routers[0].request_shutdown()
        await asyncio.wait_for(router, 30)
        await logo.server.stop(0)
        await model.server.stop(0)
        executor.shutdown(wait=False, cancel_futures=True)


def test_one_trace_spans_client_router_logo_and_model_server(tmp_path, monkeypatch, test_photos):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = tracing.configure(provider)
    try:
        response = asyncio.run(_scenario(tmp_path, monkeypatch, provider, test_photos[0].path.read_bytes()))
    finally:
        tracing.configure(previous)
    assert response.label and response.logo_consulted and response.route != pb.ROUTE_FALLBACK_GLOBAL

    spans = exporter.get_finished_spans()
    [client] = [s for s in spans if s.name == RECOGNIZE and s.kind == SpanKind.CLIENT]
    trace_id = client.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]

    def child(name: str, kind: SpanKind, parent) -> object:
        found = [s for s in in_trace if s.name == name and s.kind == kind
                 and s.parent is not None and s.parent.span_id == parent.context.span_id]
        assert found, f"no {kind.name} span {name} under {parent.name}: {[(s.name, s.kind) for s in in_trace]}"
        return found[0]

    router_span = child(RECOGNIZE, SpanKind.SERVER, client)
    logo_call = child(MATCH_LOGO, SpanKind.CLIENT, router_span)
    logo_span = child(MATCH_LOGO, SpanKind.SERVER, logo_call)
    predict_call = child(PREDICT, SpanKind.CLIENT, router_span)
    model_span = child(PREDICT, SpanKind.SERVER, predict_call)
    assert router_span.parent.is_remote and logo_span.parent.is_remote and model_span.parent.is_remote
    assert all(s.status.is_ok for s in (router_span, logo_span, model_span))
    # Health checks are not traced.
    assert not [s for s in spans if s.name.startswith("/grpc.health.v1.")]


def test_otlp_export_when_the_endpoint_is_set(make_router, logo_service, recognition, test_photos):
    """A router process with OTEL_EXPORTER_OTLP_ENDPOINT sends its spans to that OTLP/gRPC collector."""
    import time
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    spans: list[tuple[str, str, int, bytes, bytes]] = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            for resource_spans in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
                for scope in resource_spans.scope_spans:
                    spans.extend((service, s.name, s.kind, s.trace_id, s.parent_span_id) for s in scope.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    collector = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    try:
        router = make_router(logo_service.address, env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                                                        "OTEL_BSP_SCHEDULE_DELAY": "100"})
        router.wait_healthy()
        with grpc.insecure_channel(router.address) as channel:
            pb_grpc.RecognitionServiceStub(channel).Recognize(
                pb.RecognizeRequest(image=test_photos[1].path.read_bytes()), timeout=60)
        deadline = time.monotonic() + 20
        while not [s for s in spans if s[1] == RECOGNIZE] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # the client spans end before the server span: they are exported with it or before
    finally:
        collector.stop(0)
    [server] = [s for s in spans if s[1] == RECOGNIZE and s[2] == 2]  # SPAN_KIND_SERVER
    assert server[0] == "carrecog-router" and server[4] == b""  # a root: the caller sent no trace context
    children = {s[1] for s in spans if s[3] == server[3] and s[2] == 3}  # SPAN_KIND_CLIENT, same trace
    assert children >= {MATCH_LOGO, PREDICT}, children
