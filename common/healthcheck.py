"""python -m common.healthcheck HOST:PORT [SERVICE]: exit 0 when grpc.health.v1 says SERVING.

Container health checks use it, so images need no extra grpc_health_probe binary;
the test and `make run` launcher use `status` too.
"""
from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def status(address: str, service: str = "", credentials: grpc.ChannelCredentials | None = None,
           server_name: str | None = None, timeout: float = 3.0) -> str:
    """The health status name (e.g. "SERVING"), or the gRPC error code's name when it cannot answer."""
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    channel = (grpc.secure_channel(address, credentials, options=options) if credentials
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m common.healthcheck HOST:PORT [SERVICE]")
    result = status(sys.argv[1], *sys.argv[2:3])
    print(f"{sys.argv[1]}: {result}")
    sys.exit(0 if result == "SERVING" else 1)
