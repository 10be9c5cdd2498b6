"""One small bootstrap for every carrecog gRPC server.

It gives each service what a service mesh expects: grpc.health.v1 (NOT_SERVING
until the service says it has warmed up), optional reflection, keepalive, an
explicit max message size, a concurrency limit (excess calls get
RESOURCE_EXHAUSTED; health checks are exempt), optional TLS / mTLS, the
shared interceptor (request ids, error mapping, access log), Prometheus
metrics over HTTP (common.metrics, `<PREFIX>_METRICS_PORT`), OpenTelemetry
traces when OTEL_EXPORTER_OTLP_ENDPOINT is set (common.tracing), a loopback
bind unless told otherwise, and graceful shutdown on SIGTERM / SIGINT.

Usage (inside an asyncio program):

    settings = ServerSettings.from_args(args)           # see add_server_arguments
    server = GrpcServer("logo", settings, [SERVICE_FULL_NAME])
    add_LogoServiceServicer_to_server(servicer, server.server)
    await server.start()
    ... warm up ...
    await server.set_serving(True)
    await server.wait_for_shutdown()
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common import tracing
from common.interceptors import ServiceInterceptor
from common.logs import log_event

logger = logging.getLogger("carrecog.server")

MIB = 1024 * 1024
# Loopback unless told otherwise: on one host (make run, tests) nothing outside can reach a
# service; containers and pods set <PREFIX>_HOST=0.0.0.0 and should set TLS too.
DEFAULT_HOST = "127.0.0.1"
# Prometheus /metrics ports by env prefix (docs/operations.md, "Metrics, traces and the load test"); other prefixes: off unless set.
DEFAULT_METRICS_PORTS = {"ROUTER": 9450, "LOGO": 9451, "MODEL_SERVER": 9452}
# gRPC ports by env prefix: the one place they are defined (services, harness, clients import them).
DEFAULT_PORTS = {"ROUTER": 50050, "LOGO": 50051, "MODEL_SERVER": 8500}
DEFAULT_ROUTER_ADDRESS = f"localhost:{DEFAULT_PORTS['ROUTER']}"  # the clients' default (node, go, cpp say the same)


def port_from_env(prefix: str) -> int:
    """<PREFIX>_PORT, or the service's default gRPC port."""
    return int(env(f"{prefix}_PORT", str(DEFAULT_PORTS[prefix])))


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_bool(name: str, default: bool = False) -> bool:
    value = env(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ServerSettings:
    """Transport settings shared by every service; read once at start."""

    host: str = DEFAULT_HOST
    port: int = 0
    max_message_bytes: int = 32 * MIB
    max_concurrent_rpcs: int = 64
    reflection: bool = False
    grace_seconds: float = 10.0
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # set: clients must present a cert (mTLS)
    port_file: str | None = None  # where the bound port is written (tests use port 0)
    # Prometheus /metrics over HTTP on `host`: None = off, 0 = any free port (written to
    # `<port_file>.metrics` beside the gRPC port file).
    metrics_port: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerSettings":
        return cls(
            host=args.host,
            port=args.port,
            max_message_bytes=int(args.max_message_mb * MIB),
            max_concurrent_rpcs=args.max_concurrent_rpcs,
            reflection=args.reflection,
            grace_seconds=args.grace_seconds,
            tls_cert_file=args.tls_cert,
            tls_key_file=args.tls_key,
            tls_client_ca_file=args.tls_client_ca,
            port_file=args.port_file,
            metrics_port=args.metrics_port if args.metrics_port is not None and args.metrics_port >= 0 else None,
        )


def add_server_arguments(parser: argparse.ArgumentParser, prefix: str, default_port: int) -> None:
    """Flags for ServerSettings; each defaults to the env var <PREFIX>_<NAME>."""
    p = prefix.upper()
    parser.add_argument("--host", default=env(f"{p}_HOST", DEFAULT_HOST),
                        help=f"bind address; 0.0.0.0 for every interface (${p}_HOST)")
    parser.add_argument("--port", type=int, default=int(env(f"{p}_PORT", str(default_port))),
                        help=f"gRPC port, 0 = any free port (${p}_PORT)")
    parser.add_argument("--max-message-mb", type=float, default=float(env(f"{p}_MAX_MESSAGE_MB", "32")),
                        help=f"max request/response size in MiB (${p}_MAX_MESSAGE_MB)")
    parser.add_argument("--max-concurrent-rpcs", type=int, default=int(env(f"{p}_MAX_CONCURRENT_RPCS", "64")),
                        help=f"calls beyond this get RESOURCE_EXHAUSTED (${p}_MAX_CONCURRENT_RPCS)")
    parser.add_argument("--reflection", action="store_true", default=env_bool(f"{p}_REFLECTION"),
                        help=f"enable gRPC server reflection (${p}_REFLECTION=1)")
    parser.add_argument("--grace-seconds", type=float, default=float(env(f"{p}_GRACE_SECONDS", "10")),
                        help=f"how long in-flight calls may finish after SIGTERM (${p}_GRACE_SECONDS)")
    parser.add_argument("--tls-cert", default=env(f"{p}_TLS_CERT"), help=f"server certificate PEM (${p}_TLS_CERT)")
    parser.add_argument("--tls-key", default=env(f"{p}_TLS_KEY"), help=f"server private key PEM (${p}_TLS_KEY)")
    parser.add_argument("--tls-client-ca", default=env(f"{p}_TLS_CLIENT_CA"),
                        help=f"CA PEM that client certificates must chain to: enables mTLS (${p}_TLS_CLIENT_CA)")
    parser.add_argument("--port-file", default=env(f"{p}_PORT_FILE"),
                        help="write the bound port to this file once listening")
    parser.add_argument("--metrics-port", type=int, default=_metrics_port_default(p),
                        help=f"Prometheus /metrics HTTP port on the same host, 0 = any free port (written to "
                             f"<port-file>.metrics), negative or empty = off (${p}_METRICS_PORT)")
    parser.add_argument("--log-level", default=env(f"{p}_LOG_LEVEL", "INFO"))


def _metrics_port_default(prefix: str) -> int:
    """$<PREFIX>_METRICS_PORT; set but empty means off (-1), unset means the service's default."""
    raw = os.environ.get(f"{prefix}_METRICS_PORT")
    if raw is None:
        return DEFAULT_METRICS_PORTS.get(prefix, -1)
    return int(raw) if raw.strip() else -1


def write_port_file(path: str, port: int) -> None:
    """Write a bound port for whoever started us (tests, make run); atomic, so no reader sees half a file."""
    tmp = Path(path + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured, else None (plaintext)."""
    if not settings.tls_cert_file and not settings.tls_key_file:
        if settings.tls_client_ca_file:
            raise ValueError("a client CA (mTLS) needs a server certificate and key too")
        return None
    if not (settings.tls_cert_file and settings.tls_key_file):
        raise ValueError("TLS needs both a certificate and a key file")
    cert = Path(settings.tls_cert_file).read_bytes()
    key = Path(settings.tls_key_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options both sides agree on: message size and keepalive."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class GrpcServer:
    """A grpc.aio server with health, reflection, limits and graceful shutdown."""

    def __init__(self, name: str, settings: ServerSettings, service_names: Sequence[str],
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (), unlimited_methods: Sequence[str] = ()
                 ) -> None:
        """`unlimited_methods`: full method names ("/pkg.Service/Method") outside the concurrency limit, like
        health checks: cheap calls that must answer however busy the service is."""
        self.name = name
        self.settings = settings
        self.service_names = list(service_names)
        options = channel_options(settings.max_message_bytes) + [
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),  # accept clients' keepalive pings
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
        ]
        # The concurrency limit lives in the interceptor, not in grpc's maximum_concurrent_rpcs,
        # which would count health checks too and refuse them under load. Tracing comes first:
        # its span (and the caller's trace context) covers everything that runs in the call.
        observer = None
        if settings.metrics_port is not None:
            from common.metrics import RPC_METRICS  # prometheus-client only where metrics are served
            observer = RPC_METRICS
        self.server = grpc.aio.server(
            interceptors=[*tracing.server_interceptors(tracing.current()),
                          ServiceInterceptor(settings.max_concurrent_rpcs, observer, unlimited_methods),
                          *interceptors],
            options=options,
        )
        self.metrics = None  # common.metrics.MetricsServer once started
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = 0
        self._stopping = asyncio.Event()

    async def start(self) -> int:
        """Bind, start serving (health NOT_SERVING), write the port file; returns the port."""
        if self.settings.reflection:
            reflection.enable_server_reflection(
                [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
            )
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        await self.set_serving(False)
        await self.server.start()
        if self.settings.metrics_port is not None:
            from common.metrics import MetricsServer
            self.metrics = MetricsServer(self.settings.host, self.settings.metrics_port)
            if self.settings.port_file:  # before the port file: whoever waits for it finds both
                write_port_file(self.settings.port_file + ".metrics", self.metrics.port)
            log_event(logger, "metrics listening", port=self.metrics.port, path="/metrics")
        if self.settings.port_file:
            write_port_file(self.settings.port_file, self.port)
        log_event(logger, "listening", port=self.port, tls=credentials is not None,
                  mtls=bool(self.settings.tls_client_ca_file), reflection=self.settings.reflection)
        return self.port

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    async def set_serving(self, serving: bool) -> None:
        """Health status for the whole server ("") and each named service."""
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", *self.service_names):
            await self.health.set(service, status)

    def request_shutdown(self) -> None:
        self._stopping.set()

    async def wait_for_shutdown(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain: NOT_SERVING, refuse new calls, let in-flight ones finish."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        stop_task = asyncio.create_task(self._stopping.wait())
        done_task = asyncio.create_task(self.server.wait_for_termination())
        await asyncio.wait({stop_task, done_task}, return_when=asyncio.FIRST_COMPLETED)
        if self._stopping.is_set():
            log_event(logger, "shutting down", grace_seconds=self.settings.grace_seconds)
            # Tell load balancers first, so they stop sending before we stop accepting.
            await self.health.enter_graceful_shutdown()
            await self.server.stop(self.settings.grace_seconds)
        for task in (stop_task, done_task):
            task.cancel()
        if self.metrics is not None:
            await loop.run_in_executor(None, self.metrics.close)
        log_event(logger, "stopped")
