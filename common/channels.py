"""Client channels to downstream services, with the same TLS / size / keepalive rules."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc

from common import tracing
from common.logs import REQUEST_ID, REQUEST_ID_HEADER
from common.server import channel_options, env

# Reconnect quickly after a downstream restarts: grpc's defaults back off up to 120 s
# (and wait at least 20 s for a connection), which kept the router from answering for
# ~10 s after its model server was back.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class DownstreamSettings:
    """Where a downstream service listens and how to reach it (TLS / mTLS); read once at start."""

    address: str
    tls_ca: str | None = None  # CA bundle that the server certificate chains to: enables TLS
    tls_client_cert: str | None = None  # client certificate and key: mTLS
    tls_client_key: str | None = None
    tls_server_name: str | None = None  # override the name checked in the server certificate

    @classmethod
    def from_args(cls, args: argparse.Namespace, dest: str) -> "DownstreamSettings":
        return cls(address=getattr(args, dest), tls_ca=getattr(args, f"{dest}_tls_ca"),
                   tls_client_cert=getattr(args, f"{dest}_tls_client_cert"),
                   tls_client_key=getattr(args, f"{dest}_tls_client_key"),
                   tls_server_name=getattr(args, f"{dest}_tls_server_name"))


def add_downstream_arguments(parser: argparse.ArgumentParser, flag: str, env_prefix: str, help: str,
                             default: str | None = None) -> None:
    """--<flag> HOST:PORT plus --<flag>-tls-ca/-client-cert/-client-key/-server-name, each
    defaulting to $<ENV_PREFIX>_ADDRESS / _TLS_CA / _TLS_CLIENT_CERT / _TLS_CLIENT_KEY / _TLS_SERVER_NAME."""
    parser.add_argument(f"--{flag}", default=env(f"{env_prefix}_ADDRESS", default),
                        help=f"{help} (${env_prefix}_ADDRESS)")
    for suffix, what in (("tls-ca", "CA PEM the server certificate chains to; enables TLS"),
                         ("tls-client-cert", "client certificate PEM for mTLS"),
                         ("tls-client-key", "client private key PEM for mTLS"),
                         ("tls-server-name", "name to check in the server certificate")):
        variable = f"{env_prefix}_{suffix.upper().replace('-', '_')}"
        parser.add_argument(f"--{flag}-{suffix}", default=env(variable), help=f"{what} (${variable})")


def tls_credentials(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> grpc.ChannelCredentials:
    """Channel TLS credentials from PEM files; a client cert and key make it mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


def downstream_channel(settings: DownstreamSettings, max_message_bytes: int) -> grpc.aio.Channel:
    """An aio channel to a downstream: TLS when a CA is set, mTLS with a client cert and key too;
    traced (the caller's trace context sent along) when tracing is on (common.tracing)."""
    options = channel_options(max_message_bytes) + RECONNECT_OPTIONS
    interceptors = tracing.client_interceptors(tracing.current())
    if not settings.tls_ca:
        if settings.tls_client_cert or settings.tls_client_key:
            raise ValueError(f"{settings.address}: a client certificate (mTLS) needs the server's CA too")
        return grpc.aio.insecure_channel(settings.address, options=options, interceptors=interceptors)
    credentials = tls_credentials(settings.tls_ca, settings.tls_client_cert, settings.tls_client_key)
    if settings.tls_server_name:
        options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return grpc.aio.secure_channel(settings.address, credentials, options=options, interceptors=interceptors)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call: forwards the current request id."""
    request_id = REQUEST_ID.get()
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()
