"""python -m common.healthcheck HOST:PORT [SERVICE]: exit 0 when grpc.health.v1 says SERVING.

Container health checks use it, so images need no extra grpc_health_probe binary.
"""
from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return False
    print(f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return reply.status == health_pb2.HealthCheckResponse.SERVING


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m common.healthcheck HOST:PORT [SERVICE]")
    sys.exit(0 if check(sys.argv[1], *sys.argv[2:3]) else 1)
