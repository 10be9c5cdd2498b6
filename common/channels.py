"""Client channels to downstream services, with the same TLS / size / keepalive rules."""
from __future__ import annotations

from pathlib import Path

import grpc

from common.logs import REQUEST_ID, REQUEST_ID_HEADER
from common.server import channel_options, env


def tls_credentials(ca_file: str, cert_file: str | None = None, key_file: str | None = None) -> grpc.ChannelCredentials:
    """Channel TLS credentials from PEM files; a client cert and key make it mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


def downstream_channel(target: str, prefix: str, max_message_bytes: int) -> grpc.aio.Channel:
    """An aio channel to `target`; TLS when <PREFIX>_TLS_CA (and for mTLS the client cert/key) are set.

    <PREFIX>_TLS_CA            CA bundle that the server certificate chains to
    <PREFIX>_TLS_CLIENT_CERT   client certificate (mTLS)
    <PREFIX>_TLS_CLIENT_KEY    client key (mTLS)
    <PREFIX>_TLS_SERVER_NAME   override the name checked in the server certificate
    """
    if not target:
        raise ValueError(f"no address configured for {prefix} (set {prefix}_ADDRESS)")
    options = channel_options(max_message_bytes)
    ca = env(f"{prefix}_TLS_CA")
    if not ca:
        return grpc.aio.insecure_channel(target, options=options)
    credentials = tls_credentials(ca, env(f"{prefix}_TLS_CLIENT_CERT"), env(f"{prefix}_TLS_CLIENT_KEY"))
    server_name = env(f"{prefix}_TLS_SERVER_NAME")
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(target, credentials, options=options)


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a downstream call: forwards the current request id."""
    request_id = REQUEST_ID.get()
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()
