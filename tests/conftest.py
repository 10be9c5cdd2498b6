"""Shared fixtures: the real services, started once per test session on ephemeral ports."""
from __future__ import annotations

import json
import signal

import grpc
import pytest

from carrecog.v1 import logo_service_pb2, logo_service_pb2_grpc
from carrecog.v1 import recognition_service_pb2_grpc
from common.data import data_dir
from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from logo_service.settings import DEFAULT_CALIBRATION
from router_service.settings import DEFAULT_GLOBAL_MODEL
from harness.stack import start_logo_service, start_model_server, start_router
from dataset.split import load_split


@pytest.fixture(scope="session")
def stack_logs(tmp_path_factory):
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def launched(stack_logs):
    """The session's model server and logo service, started side by side: each binds its port at once and
    says SERVING when it has loaded, so neither waits for the other (the fixtures below wait for health)."""
    models = start_model_server(stack_logs)
    logo = start_logo_service(stack_logs)
    yield models, logo
    logo.stop()
    models.stop()


@pytest.fixture(scope="session")
def model_server(launched):
    launched[0].wait_healthy()
    return launched[0]


@pytest.fixture(scope="session")
def logo_service(launched):
    launched[1].wait_healthy()
    return launched[1]


# Tests that start a model server of their own and need only the default model: the others take
# about 20 s more to load and warm up.
DEFAULT_MODEL_ONLY = (DEFAULT_GLOBAL_MODEL,)

# The session's router sends every photo through the logo stage, so the logo routes can be tested
# on any photo; the default policy (uncertain) has its own tests (tests/test_logo_policy.py).
LOGO_ALWAYS = {"ROUTER_LOGO_POLICY": "always"}


@pytest.fixture(scope="session")
def router(stack_logs, launched):
    """Started while the model server is still loading: it says SERVING once it has discovered the models."""
    models, logo = launched
    service = start_router(models.address, logo.address, stack_logs, env=LOGO_ALWAYS)
    for started in (models, logo, service):
        started.wait_healthy()
    yield service
    service.stop()


@pytest.fixture
def make_router(model_server, stack_logs):
    """Start extra routers against the session's model server; they are killed after the test."""
    started = []

    def make(logo_address: str, env: dict[str, str] | None = None, **kwargs):
        router = start_router(model_server.address, logo_address, stack_logs, env={**LOGO_ALWAYS, **(env or {})},
                              **kwargs)
        started.append(router)
        return router

    yield make
    for router in started:
        router.stop(signal.SIGKILL)


@pytest.fixture
def own_logo_service(stack_logs, request):
    """A logo service of the test's own, to hang (SIGSTOP) or kill; killed after the test."""
    service = start_logo_service(stack_logs / f"logo-{request.node.name}"[:80])
    try:
        service.wait_healthy()
        yield service
    finally:
        service.process.send_signal(signal.SIGCONT)
        service.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def recognition(router):
    with grpc.insecure_channel(router.address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        yield recognition_service_pb2_grpc.RecognitionServiceStub(channel)


@pytest.fixture(scope="session")
def logo_stub(logo_service):
    with grpc.insecure_channel(logo_service.address) as channel:
        yield logo_service_pb2_grpc.LogoServiceStub(channel)


@pytest.fixture(scope="session")
def plugins():
    return load_plugins(DEFAULT_PLUGINS_DIR, data_dir())


@pytest.fixture(scope="session")
def test_photos():
    """The test split, the photos the gate fired on at calibration first (logo_service/calibration.json):
    the gate fires on under 1 % of photos, so the logo fixtures below find a hit without asking about
    hundreds of photos; they still ask the real logo service about each."""
    fired = {row[0] for row in json.loads(DEFAULT_CALIBRATION.read_text())["test"]["fired_photos"]}
    return sorted((p for p in load_split() if p.split == "test"), key=lambda p: p.image_id not in fired)


@pytest.fixture(scope="session")
def logo_hit(logo_stub, plugins, test_photos):
    """A test-split photo on which the logo gate fires for a brand that has a model."""
    makes = {m: slug for slug, p in plugins.items() if p.model for m in p.makes}
    for photo in [p for p in test_photos if p.make in makes]:
        reply = logo_stub.MatchLogo(logo_service_pb2.MatchLogoRequest(image=photo.path.read_bytes()), timeout=30)
        if reply.matched:
            return photo, reply.best.brand
    pytest.fail("the logo gate fired on no test photo of a brand with a model")


@pytest.fixture(scope="session")
def no_logo_photo(logo_stub, plugins, test_photos):
    """A test-split photo of a make without a model of its own on which the gate stays quiet."""
    model_makes = {m for p in plugins.values() if p.model for m in p.makes}
    for photo in [p for p in test_photos if p.make not in model_makes][:50]:
        reply = logo_stub.MatchLogo(logo_service_pb2.MatchLogoRequest(image=photo.path.read_bytes()), timeout=30)
        if not reply.matched:
            return photo
    pytest.fail("the logo gate fired on 50 of 50 photos of makes without a model")


@pytest.fixture(scope="session")
def restricted_hit(logo_stub, plugins, test_photos):
    """A test-split photo on which the gate fires for a make whose plugin has no model (logo only)."""
    logo_only = {m: slug for slug, p in plugins.items() if not p.model for m in p.makes}
    for photo in [p for p in test_photos if p.make in logo_only]:
        reply = logo_stub.MatchLogo(logo_service_pb2.MatchLogoRequest(image=photo.path.read_bytes()), timeout=30)
        if reply.matched and reply.best.brand == logo_only[photo.make]:
            return photo, reply.best.brand
    pytest.fail("the logo gate fired on no test photo of a logo-only make")
