"""Prometheus metrics (common.metrics): a real Prometheus scrapes the session's stack.

The session fixtures' services take ephemeral metrics ports (harness/stack.py reads
them from `<port file>.metrics`); the committed deploy/prometheus/prometheus.yml is
rendered with those ports and a 1 s scrape interval and run by the real `prometheus`
(Debian package, installed by `make prometheus`, a prerequisite of `make test`).
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from carrecog.v1 import logo_service_pb2, logo_service_pb2_grpc
from carrecog.v1 import recognition_service_pb2 as pb
from common.server import GrpcServer, ServerSettings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
JOBS = {"carrecog-router": "router", "carrecog-logo": "logo_service", "carrecog-model-server": "model_server"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make prometheus` apt-installs it (Debian package prometheus)")
    return path


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read().decode()


def _metrics(port: int) -> str:
    return _get(f"http://127.0.0.1:{port}/metrics")


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in Prometheus' text format (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_committed_config_is_valid():
    result = subprocess.run([_tool("promtool"), "check", "config", str(PROMETHEUS_YML)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"carrecog-router": ["127.0.0.1:9450"], "carrecog-logo": ["127.0.0.1:9451"],
                       "carrecog-model-server": ["127.0.0.1:9452"]}


@pytest.fixture
def prometheus(tmp_path, router, logo_service, model_server):
    """A real Prometheus scraping the session's three services every second; yields its query function."""
    services = {"router": router, "logo_service": logo_service, "model_server": model_server}
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    for job in config["scrape_configs"]:
        service = services[JOBS[job["job_name"]]]
        assert service.metrics_port, f"{service.name} serves no metrics"
        job["static_configs"] = [{"targets": [f"127.0.0.1:{service.metrics_port}"]}]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = _free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    process = subprocess.Popen([_tool("prometheus"), f"--config.file={config_file}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict]:
        reply = json.loads(_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if "Ready" in _get(f"{base}/-/ready", timeout=1):
                    break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "prometheus not ready in 60 s"
            time.sleep(0.2)
        yield query
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_for(query, expr: str, expected: float, timeout: float = 30.0) -> float:
    """Poll until the query's single value equals `expected` (Prometheus scrapes every second)."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        result = query(expr)
        value = float(result[0]["value"][1]) if result else None
        if value == expected:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {value}, expected {expected}")


def test_prometheus_scrapes_the_stack(prometheus, router, logo_service, model_server, recognition, logo_stub,
                                      test_photos):
    handled = 'sum(grpc_server_handled_total{job="carrecog-router",grpc_service="carrecog.v1.RecognitionService",' \
              'grpc_method="Recognize",grpc_code="%s"})'
    before = _metrics(router.metrics_port)
    ok_before = _sample(before, "grpc_server_handled_total", grpc_method="Recognize", grpc_code="OK")
    bad_before = _sample(before, "grpc_server_handled_total", grpc_method="Recognize", grpc_code="INVALID_ARGUMENT")
    stages_before = {stage: _sample(before, "carrecog_router_stage_seconds_count", stage=stage)
                     for stage in ("logo", "predict", "total")}
    calls = 4
    answers = [recognition.Recognize(pb.RecognizeRequest(image=photo.path.read_bytes()), timeout=60)
               for photo in test_photos[:calls]]
    # The router's logo policy may skip the logo stage on confident photos: ask the logo service too.
    logo_stub.MatchLogo(logo_service_pb2.MatchLogoRequest(image=test_photos[0].path.read_bytes()), timeout=60)
    with pytest.raises(grpc.RpcError) as refused:
        recognition.Recognize(pb.RecognizeRequest(image=b"not an image"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Prometheus' view: the calls just made, by status code, and every target up.
    _wait_for(prometheus, handled % "OK", ok_before + calls)
    _wait_for(prometheus, handled % "INVALID_ARGUMENT", bad_before + 1)
    for job in JOBS:
        _wait_for(prometheus, f'up{{job="{job}"}}', 1)
    started = prometheus('sum(grpc_server_started_total{job="carrecog-router",grpc_method="Recognize"})')
    assert float(started[0]["value"][1]) >= ok_before + calls + bad_before + 1

    # The services' /metrics, read directly: routes, stage histograms, the gate, batch sizes.
    text = _metrics(router.metrics_port)
    assert _sample(text, "grpc_server_handled_total", grpc_type="unary", grpc_method="Recognize",
                   grpc_code="OK") == ok_before + calls
    routes = sum(float(v) for v in re.findall(r'^carrecog_router_answers_total\{[^}]*\} (\S+)$', text, re.M))
    assert routes >= calls
    stages = {stage: _sample(text, "carrecog_router_stage_seconds_count", stage=stage) - stages_before[stage]
              for stage in ("logo", "predict", "total")}
    # Each answer's timings, one observation each ("predict:<model>" -> predict).
    assert stages == {stage: sum(1 for a in answers for t in a.timings if t.stage.split(":")[0] == stage)
                      for stage in ("logo", "predict", "total")}, stages
    assert stages["total"] == calls and stages["predict"] >= calls
    assert _sample(text, "grpc_server_handling_seconds_count", grpc_method="Recognize") >= calls
    assert 'carrecog_grpc_server_in_flight{grpc_method="Recognize"' in text
    logo = _metrics(logo_service.metrics_port)
    assert re.search(r'^carrecog_logo_gate_total\{brand="\w+",fired="(true|false)"\} \d', logo, re.M), logo[-2000:]
    assert _sample(logo, "grpc_server_handled_total", grpc_method="MatchLogo", grpc_code="OK") >= 1
    model = _metrics(model_server.metrics_port)
    assert _sample(model, "carrecog_model_server_batch_size_count", model="efficientnet_lite0") >= calls
    assert _sample(model, "grpc_server_handled_total", grpc_service="tensorflow.serving.PredictionService",
                   grpc_method="Predict", grpc_code="OK") >= calls
    # Health checks (stack.py polled them) are not counted.
    assert "grpc.health.v1" not in text


class _Logo(logo_service_pb2_grpc.LogoServiceServicer):
    async def MatchLogo(self, request, context):
        return logo_service_pb2.MatchLogoResponse(matched=True, best=logo_service_pb2.LogoMatch(brand="audi"))


def test_refused_calls_count_as_handled_resource_exhausted():
    """Calls over the concurrency limit (here 0) are started and handled with RESOURCE_EXHAUSTED."""

    async def scenario() -> tuple[str, str]:
        server = GrpcServer("logo", ServerSettings(max_concurrent_rpcs=0, metrics_port=0), ["carrecog.v1.LogoService"])
        logo_service_pb2_grpc.add_LogoServiceServicer_to_server(_Logo(), server.server)
        await server.start()
        try:
            before = await asyncio.to_thread(_metrics, server.metrics_port)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = logo_service_pb2_grpc.LogoServiceStub(channel)
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.MatchLogo(logo_service_pb2.MatchLogoRequest(image=b"x"), timeout=5)
                    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return before, await asyncio.to_thread(_metrics, server.metrics_port)
        finally:
            await server.server.stop(0)
            await asyncio.to_thread(server.metrics.close)

    before, after = asyncio.run(scenario())
    labels = dict(grpc_service="carrecog.v1.LogoService", grpc_method="MatchLogo")
    assert _sample(after, "grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED", **labels) - \
        _sample(before, "grpc_server_handled_total", grpc_code="RESOURCE_EXHAUSTED", **labels) == 3
    assert _sample(after, "grpc_server_started_total", **labels) - \
        _sample(before, "grpc_server_started_total", **labels) == 3
    assert _sample(after, "carrecog_grpc_server_in_flight", **labels) == 0
