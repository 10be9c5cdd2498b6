"""Shared fixtures: the real services, started once per test session on ephemeral ports."""
from __future__ import annotations

import grpc
import pytest

from carrecog.v1 import logo_service_pb2_grpc
from carrecog.v1 import recognition_service_pb2_grpc
from scripts.stack import start_logo_service, start_model_server, start_router


@pytest.fixture(scope="session")
def stack_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def model_server(stack_logs):
    service = start_model_server(stack_logs)
    service.wait_healthy()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def logo_service(stack_logs):
    service = start_logo_service(stack_logs)
    service.wait_healthy()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def router(stack_logs, model_server, logo_service):
    service = start_router(model_server.address, logo_service.address, stack_logs)
    service.wait_healthy()
    yield service
    service.stop()


@pytest.fixture(scope="session")
def recognition(router):
    with grpc.insecure_channel(router.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield recognition_service_pb2_grpc.RecognitionServiceStub(channel)


@pytest.fixture(scope="session")
def logo_stub(logo_service):
    with grpc.insecure_channel(logo_service.address) as channel:
        yield logo_service_pb2_grpc.LogoServiceStub(channel)
