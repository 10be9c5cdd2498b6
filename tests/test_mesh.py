"""A real Envoy (deploy/envoy/envoy.yaml via harness/mesh.py) in front of three real routers.

Clients speak TLS to Envoy, Envoy speaks mTLS and HTTP/2 to the routers. Two
routers are SERVING; the third is started against a model server address where
nothing listens, so it reports NOT_SERVING for the whole module. Envoy's admin
endpoint (loopback) is the witness: health-check counters, per-router request
counts, retries.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
import yaml

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from common.channels import tls_credentials
from harness.mesh import MeshTls, make_certs, render, router_tls_env, start_envoy, write_config
from harness.stack import ROOT, free_port, start_router

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("mesh-certs"))


@pytest.fixture(scope="module")
def mesh(model_server, logo_service, certs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("mesh")
    env = router_tls_env(certs)
    dead_model_server = f"127.0.0.1:{free_port()}"
    # The three routers import TensorFlow at the same time: ~20 s instead of ~45 s one after the other.
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(start_router, model_server.address, logo_service.address, logs / "a", env=env),
                   pool.submit(start_router, model_server.address, logo_service.address, logs / "b", env=env),
                   pool.submit(start_router, dead_model_server, logo_service.address, logs / "c", env=env)]
        routers = []
        try:
            for future in futures:
                routers.append(future.result())
        except BaseException:
            for router in routers:
                router.stop(signal.SIGKILL)
            raise
    a, b, not_serving = routers
    config = write_config(logs / "envoy.yaml", render("127.0.0.1:0", [r.address for r in routers],
                                                      MeshTls.from_dir(certs), admin_port=0))
    envoy = start_envoy(config, logs)
    try:
        envoy.wait_healthy_hosts(2, timeout=120)
        port = envoy.listener_port()
        channel = grpc.secure_channel(f"127.0.0.1:{port}", tls_credentials(str(certs / "ca.pem")),
                                      options=[("grpc.ssl_target_name_override", "localhost")])
        with channel:
            yield SimpleNamespace(envoy=envoy, port=port, a=a, b=b, not_serving=not_serving, certs=certs,
                                  stub=pb_grpc.RecognitionServiceStub(channel))
    finally:
        envoy.stop()
        for router in routers:
            router.stop(signal.SIGKILL)


def router_health(mesh, router) -> str:
    """The router's own grpc.health.v1 answer, asked over mTLS with Envoy's client certificate."""
    c = mesh.certs
    credentials = tls_credentials(str(c / "ca.pem"), str(c / "envoy-client.pem"), str(c / "envoy-client.key"))
    return router.health("carrecog.v1.RecognitionService", credentials=credentials, server_name="router")


def test_calls_through_envoy_reach_only_serving_routers(mesh, no_logo_photo):
    assert router_health(mesh, mesh.not_serving) == "NOT_SERVING"  # up, but not warm: no model server
    image = no_logo_photo.path.read_bytes()
    replies = []
    while len(replies) < 64:  # round robin over the healthy routers; on a loaded host one may miss a check
        replies += [mesh.stub.Recognize(pb.RecognizeRequest(image=image), timeout=60) for _ in range(16)]
        hosts = mesh.envoy.hosts()
        if hosts[mesh.a.address]["rq_total"] > 0 and hosts[mesh.b.address]["rq_total"] > 0:
            break
    assert all(r.label for r in replies)
    assert {r.route for r in replies} <= {pb.ROUTE_GLOBAL_MODEL, pb.ROUTE_BRAND_MODEL}

    assert hosts[mesh.not_serving.address]["rq_total"] == 0
    assert not hosts[mesh.not_serving.address]["healthy"]
    assert hosts[mesh.a.address]["healthy"] and hosts[mesh.b.address]["healthy"]
    assert hosts[mesh.a.address]["rq_total"] > 0 and hosts[mesh.b.address]["rq_total"] > 0
    assert hosts[mesh.a.address]["rq_total"] + hosts[mesh.b.address]["rq_total"] >= 16
    stats = mesh.envoy.stats()
    assert stats["membership_total"] == 3 and stats["membership_healthy"] == 2
    assert stats["health_check.success"] > 0
    assert stats["health_check.failure"] > 0  # the NOT_SERVING router's answers
    assert stats.get("health_check.network_failure", 0) == 0  # it answered: it is up, only not serving
    assert stats["upstream_rq_200"] >= 16  # gRPC calls answer HTTP 200; their status is in the trailers


def test_tls_towards_clients_is_required(mesh):
    with grpc.insecure_channel(f"127.0.0.1:{mesh.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RecognitionServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # and the health service answers through Envoy for whoever asks over TLS
    assert mesh.stub.ListModels(pb.ListModelsRequest(), timeout=10).global_model


def test_docker_compose_router_health_check_speaks_mtls(mesh):
    """docker-compose.yml's router health check, run here against the mTLS routers."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    script = compose["services"]["router"]["healthcheck"]["test"][-1].replace("/certs/", f"{mesh.certs}/")
    for router, expected in [(mesh.a, 0), (mesh.not_serving, 1)]:
        check = subprocess.run([sys.executable, "-c", script.replace("localhost:50050", router.address)],
                               cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert check.returncode == expected, check.stderr


def test_killing_a_router_under_load_loses_no_call(mesh, no_logo_photo):
    image = no_logo_photo.path.read_bytes()
    before = mesh.envoy.stats()
    victim, survivor = mesh.b, mesh.a
    victim_before = mesh.envoy.hosts()[victim.address]["rq_total"]
    stop = threading.Event()
    answered, failed = [], []

    def caller() -> None:
        while not stop.is_set():
            try:
                reply = mesh.stub.Recognize(pb.RecognizeRequest(image=image, options=pb.RecognizeOptions(skip_logo=True)),
                                            timeout=60)
                answered.append(reply.label)
            except grpc.RpcError as exc:
                failed.append(f"{exc.code().name}: {exc.details()}")

    callers = [threading.Thread(target=caller) for _ in range(4)]
    for thread in callers:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while mesh.envoy.hosts()[victim.address]["rq_total"] < victim_before + 4 and time.monotonic() < deadline:
            time.sleep(0.1)  # the victim is taking its share of the stream
        killed_at = len(answered)
        victim.process.send_signal(signal.SIGKILL)
        time.sleep(6)  # health checks notice within ~2 s; calls keep flowing meanwhile
    finally:
        stop.set()
        for thread in callers:
            thread.join(90)
    after = mesh.envoy.stats()
    hosts = mesh.envoy.hosts()
    print(f"\nkill under load: {len(answered)} answered ({killed_at} before the SIGKILL), {len(failed)} failed; "
          f"retries {after.get('upstream_rq_retry', 0) - before.get('upstream_rq_retry', 0)} "
          f"(succeeded {after.get('upstream_rq_retry_success', 0) - before.get('upstream_rq_retry_success', 0)}), "
          f"health-check network failures {after.get('health_check.network_failure', 0)}, "
          f"healthy routers {after.get('membership_healthy')}/{after.get('membership_total')}, "
          f"outlier ejections {after.get('outlier_detection.ejections_enforced_total', 0)}, "
          f"retry overflow {after.get('upstream_rq_retry_overflow', 0)}")

    assert failed == []
    assert killed_at > 0 and len(answered) > killed_at + 4 and all(answered)
    # the calls caught on the dead router went again, to the survivor
    assert after["upstream_rq_retry"] > before.get("upstream_rq_retry", 0)
    assert after["upstream_rq_retry_success"] > before.get("upstream_rq_retry_success", 0)
    assert after["health_check.network_failure"] > before.get("health_check.network_failure", 0)
    assert not hosts[victim.address]["healthy"] and hosts[survivor.address]["healthy"]
    assert after["membership_healthy"] == 1
    assert hosts[mesh.not_serving.address]["rq_total"] == 0
