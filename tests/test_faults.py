"""Faults: each fallback, health transitions, graceful shutdown, concurrency limit, TLS."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from router_service.server import SERVICE_NAME as SERVICE
from router_service.settings import DEFAULT_GLOBAL_MODEL as GLOBAL
from harness.stack import ROOT, free_port, start_logo_service, start_router
from harness.supervisor import Supervisor
from tests import images
from tests.conftest import LOGO_ALWAYS
from tests.certs import make_certificates
from tests.test_stack import recognize

pytestmark = pytest.mark.integration



def stub_for(service, credentials=None, options=()):
    channel = (grpc.secure_channel(service.address, credentials, options=list(options)) if credentials
               else grpc.insecure_channel(service.address))
    return channel, pb_grpc.RecognitionServiceStub(channel)


def test_logo_service_down_falls_back_to_global(make_router, logo_hit):
    router = make_router(f"127.0.0.1:{free_port()}")
    router.wait_healthy()  # a dead logo service does not make the router unhealthy
    channel, stub = stub_for(router)
    with channel:
        reply = recognize(stub, logo_hit[0].path.read_bytes())
    assert reply.route == pb.ROUTE_FALLBACK_GLOBAL
    assert reply.fallback_reason == pb.FALLBACK_REASON_LOGO_SERVICE_UNAVAILABLE
    assert reply.model_name == GLOBAL and reply.label and "logo service" in reply.route_detail


def test_slow_logo_service_falls_back_to_global(make_router, logo_service, logo_hit):
    router = make_router(logo_service.address, env={"ROUTER_LOGO_TIMEOUT_MS": "1"})
    router.wait_healthy()
    channel, stub = stub_for(router)
    with channel:
        reply = recognize(stub, logo_hit[0].path.read_bytes())
    assert reply.route == pb.ROUTE_FALLBACK_GLOBAL
    assert reply.fallback_reason == pb.FALLBACK_REASON_LOGO_SERVICE_TIMEOUT and reply.model_name == GLOBAL


def recognize_with_edited_plugin(make_router, logo_service, photo, brand, tmp_path, edit) -> pb.RecognizeResponse:
    """Recognise `photo` through a new router whose copy of `brand`'s manifest went through `edit`."""
    plugins_dir = tmp_path / "plugins"
    shutil.copytree(ROOT / "plugins", plugins_dir)
    manifest = plugins_dir / brand / "manifest.json"
    spec = json.loads(manifest.read_text())
    edit(spec)
    manifest.write_text(json.dumps(spec))
    router = make_router(logo_service.address, env={"CARRECOG_PLUGINS_DIR": str(plugins_dir)})
    router.wait_healthy()
    channel, stub = stub_for(router)
    with channel:
        return recognize(stub, photo.path.read_bytes())


def test_missing_brand_model_falls_back_to_global(make_router, logo_service, logo_hit, tmp_path):
    photo, brand = logo_hit
    reply = recognize_with_edited_plugin(make_router, logo_service, photo, brand, tmp_path,
                                         lambda spec: spec["model"].update(name=f"{brand}-not-served"))
    assert reply.logo_matched and reply.logo.brand == brand
    assert reply.route == pb.ROUTE_FALLBACK_GLOBAL
    assert reply.fallback_reason == pb.FALLBACK_REASON_BRAND_MODEL_NOT_FOUND
    assert reply.model_name == GLOBAL and "not-served" in reply.route_detail


def test_logo_of_a_make_without_a_model_restricts_the_global_model_to_it(make_router, logo_service, logo_hit,
                                                                          plugins, tmp_path):
    photo, brand = logo_hit
    reply = recognize_with_edited_plugin(make_router, logo_service, photo, brand, tmp_path,
                                         lambda spec: spec.pop("model"))  # a logo-only plugin
    assert reply.route == pb.ROUTE_LOGO_RESTRICTED and reply.logo_matched and reply.logo.brand == brand
    assert reply.model_name == GLOBAL and "restricted to" in reply.route_detail
    makes = set(plugins[brand].makes)
    assert reply.make in makes and all(p.make in makes for p in reply.top_k)  # only the matched make's classes
    assert reply.make_confidence == pytest.approx(1.0, abs=1e-5)
    assert sum(p.confidence for p in reply.top_k) <= 1.0001


def test_broken_plugin_fails_at_start_naming_the_file(model_server, tmp_path):
    plugins_dir = tmp_path / "plugins"
    (plugins_dir / "acme").mkdir(parents=True)
    (plugins_dir / "acme" / "manifest.json").write_text('{"slug": "acme", "name": ')
    with pytest.raises(RuntimeError) as err:
        start_router(model_server.address, "", tmp_path, env={"CARRECOG_PLUGINS_DIR": str(plugins_dir)})
    assert "acme/manifest.json" in str(err.value)


def test_sigterm_drains_in_flight_calls_then_exits(make_router):
    router = make_router("")
    router.wait_healthy()
    channel, stub = stub_for(router)
    results = {}

    def call():
        requests = (pb.RecognizeStreamRequest(request=pb.RecognizeRequest(image=images.photo(i), image_id=i))
                    for i in ["00007", "00008", "00009", "00010"])
        results["answers"] = list(stub.RecognizeStream(requests, timeout=120))

    with channel:
        worker = threading.Thread(target=call)
        worker.start()
        time.sleep(0.5)
        router.process.send_signal(signal.SIGTERM)
        worker.join(60)
        assert router.process.wait(30) == 0
    assert len(results["answers"]) == 4 and all(a.result.response.label for a in results["answers"])
    assert "shutting down" in router.log_path.read_text()


def test_concurrency_limit_answers_resource_exhausted(make_router):
    router = make_router("", extra_args=["--max-concurrent-rpcs", "1"])
    router.wait_healthy()
    channel, stub = stub_for(router)
    with channel:
        gate = threading.Event()

        def slow_requests():
            yield pb.RecognizeStreamRequest(request=pb.RecognizeRequest(image=images.photo("00001")))
            gate.wait(30)

        stream = stub.RecognizeStream(slow_requests(), timeout=60)
        next(stream)  # the stream now holds the only slot
        with pytest.raises(grpc.RpcError) as err:
            recognize(stub, images.photo("00002"))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # health is never limited: a busy service must not look dead to its orchestrator
        assert router.health() == "SERVING" and router.health(SERVICE) == "SERVING"
        check = subprocess.run([sys.executable, "-m", "common.healthcheck", router.address], cwd=ROOT,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        gate.set()
        list(stream)
    refused = [json.loads(line) for line in router.log_path.read_text().splitlines()
               if '"RESOURCE_EXHAUSTED"' in line]
    assert refused and refused[0]["event"] == "rpc" and refused[0]["method"].endswith("/Recognize")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """A throwaway CA, a server certificate for localhost and a client certificate."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


def test_tls_and_mtls(make_router, certificates):
    c = certificates
    ca = (c / "ca.pem").read_bytes()
    router = make_router("", env={"ROUTER_TLS_CERT": str(c / "server.pem"), "ROUTER_TLS_KEY": str(c / "server.key"),
                                  "ROUTER_TLS_CLIENT_CA": str(c / "ca.pem")})
    with_cert = grpc.ssl_channel_credentials(ca, (c / "client.key").read_bytes(), (c / "client.pem").read_bytes())
    router.wait_healthy(credentials=with_cert)
    channel, stub = stub_for(router, with_cert)
    with channel:
        assert recognize(stub, images.photo("00001")).label
    channel, stub = stub_for(router, grpc.ssl_channel_credentials(ca))  # no client certificate
    with channel, pytest.raises(grpc.RpcError) as err:
        recognize(stub, images.photo("00001"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    channel, stub = stub_for(router)  # plaintext
    with channel, pytest.raises(grpc.RpcError):
        recognize(stub, images.photo("00001"))


def test_make_run_restarts_a_dead_service_while_the_others_keep_serving(model_server, stack_logs, logo_hit):
    """What `make run` does (harness/run_stack.py): a killed logo service only degrades answers, then is back."""
    log = io.StringIO()
    supervisor = Supervisor(min_backoff_s=0.5, log=log)
    folder = stack_logs / "supervised"
    try:
        logo = supervisor.add(lambda port: start_logo_service(folder, port))
        router = supervisor.add(lambda port: start_router(model_server.address, logo.address, folder, port,
                                                          env=LOGO_ALWAYS))
        for service in supervisor.services:
            service.wait_healthy()
        photo = logo_hit[0].path.read_bytes()
        channel, stub = stub_for(router)
        with channel:
            logo.process.kill()
            logo.process.wait()
            degraded = recognize(stub, photo)  # the router keeps answering, and says why
            assert degraded.route == pb.ROUTE_FALLBACK_GLOBAL and degraded.label
            assert degraded.fallback_reason == pb.FALLBACK_REASON_LOGO_SERVICE_UNAVAILABLE
            assert supervisor.check() == ["logo_service"] and "restarting" in log.getvalue()
            restarted = supervisor.entries["logo_service"].service
            assert restarted.port == logo.port and restarted.process.pid != logo.process.pid
            restarted.wait_healthy()
            deadline = time.monotonic() + 10
            while (reply := recognize(stub, photo)).route != pb.ROUTE_BRAND_MODEL and time.monotonic() < deadline:
                time.sleep(0.2)
            assert reply.route == pb.ROUTE_BRAND_MODEL and reply.logo_matched
            assert router.process.poll() is None and supervisor.check() == []
    finally:
        supervisor.stop_all(signal.SIGKILL)
