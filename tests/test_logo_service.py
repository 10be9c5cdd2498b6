"""The logo gRPC service as a real process on an ephemeral port, called through generated stubs."""
from __future__ import annotations

import argparse
import signal

import grpc
import pytest

from carrecog.v1 import logo_service_pb2 as pb
from carrecog.v1 import logo_service_pb2_grpc as pb_grpc
from common.data import data_dir
from common.plugins import DEFAULT_PLUGINS_DIR, load_plugins
from logo_service.settings import add_arguments, settings_from_args
from harness.stack import start_service
from tests.test_logo_matcher import HIT_BRAND, HIT_BRAND_NAME, HIT_PHOTO, MISS_PHOTO, gate, small_gallery
from builders.logo_gallery import write_artifact
from dataset.split import load_split


@pytest.fixture(scope="module")
def photos():
    return {p.image_id: p for p in load_split()}


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    """The small test gallery as the artifact the service loads (gallery.npz + manifest.json)."""
    return write_artifact(small_gallery()[0], tmp_path_factory.mktemp("gallery"), "tests: small gallery")


@pytest.fixture(scope="module")
def service(gallery_dir, tmp_path_factory):
    # No training photos anywhere: the service starts from its artifact alone.
    proc = start_service("logo_service", "logo_service", ["--gallery-dir", str(gallery_dir), "--workers", "2"],
                         log_dir=tmp_path_factory.mktemp("logo"),
                         env={"CARRECOG_DATA_DIR": str(tmp_path_factory.mktemp("no-data")),
                              "CARRECOG_CACHE_DIR": str(tmp_path_factory.mktemp("no-cache"))})
    try:
        proc.wait_healthy(timeout=60)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.address) as channel:
        yield pb_grpc.LogoServiceStub(channel)


def test_health_goes_serving_for_the_server_and_the_service(service):
    assert service.health() == "SERVING"
    assert service.health("carrecog.v1.LogoService") == "SERVING"


def test_match_logo_finds_the_brand_and_where(stub, photos):
    data = photos[HIT_PHOTO].path.read_bytes()
    reply = stub.MatchLogo(pb.MatchLogoRequest(image=data), timeout=30)
    assert reply.matched and reply.min_inliers == gate()
    best = reply.best
    assert best.brand == HIT_BRAND and best.brand_name == HIT_BRAND_NAME and best.inliers >= reply.min_inliers
    assert best.exemplar.startswith("photo:") and 0 < best.score <= 1 and best.good_matches >= best.inliers
    assert 0 <= best.box.x_min < best.box.x_max < 400 and 0 <= best.box.y_min < best.box.y_max < 400
    assert reply.candidates[0] == best and reply.query_keypoints > 100 and reply.match_ms > 0


def test_no_logo_is_a_normal_answer(stub, photos):
    reply = stub.MatchLogo(pb.MatchLogoRequest(image=photos[MISS_PHOTO].path.read_bytes()), timeout=30)
    assert not reply.matched and reply.min_inliers == gate() and reply.query_keypoints > 0


def test_max_candidates_limits_the_list(stub, photos):
    data = photos[HIT_PHOTO].path.read_bytes()
    assert len(stub.MatchLogo(pb.MatchLogoRequest(image=data, max_candidates=1), timeout=30).candidates) == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.MatchLogo(pb.MatchLogoRequest(image=data, max_candidates=-1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"GIF89a not a photo", "not a JPEG or PNG"),
    ("truncated", "truncated"),
])
def test_bad_image_is_invalid_argument_with_a_message(stub, photos, data, words):
    if data == "truncated":
        data = photos[HIT_PHOTO].path.read_bytes()[:2000]
    with pytest.raises(grpc.RpcError) as err:
        stub.MatchLogo(pb.MatchLogoRequest(image=data), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()


def test_list_brands(stub):
    reply = stub.ListBrands(pb.ListBrandsRequest(), timeout=10)
    plugins = load_plugins(DEFAULT_PLUGINS_DIR, data_dir(), check_logos=False)
    assert [b.slug for b in reply.brands] == sorted(plugins)  # a plugin for every make, each in the gallery
    audi = next(b for b in reply.brands if b.slug == "audi")
    assert audi.name == "Audi" and reply.min_inliers == gate()
    assert all(b.exemplars > 0 and b.descriptors >= b.exemplars for b in reply.brands)


def test_sigterm_drains_and_exits_cleanly(gallery_dir, tmp_path):
    proc = start_service("logo_service", "logo_service", ["--gallery-dir", str(gallery_dir)], log_dir=tmp_path,
                         env={"LOGO_MIN_INLIERS": "25"})
    try:
        proc.wait_healthy(timeout=60)
        with grpc.insecure_channel(proc.address) as channel:
            assert pb_grpc.LogoServiceStub(channel).ListBrands(pb.ListBrandsRequest(), timeout=10).min_inliers == 25
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    assert '"stopped"' in proc.log_path.read_text()


def test_settings_come_from_env_and_flags(monkeypatch, tmp_path):
    def settings(*argv: str):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        return settings_from_args(parser.parse_args(list(argv)))

    assert settings().min_inliers == gate() and settings().server.port == 50051
    monkeypatch.setenv("LOGO_MIN_INLIERS", "14")
    monkeypatch.setenv("LOGO_PORT", "6000")
    monkeypatch.setenv("LOGO_WORKERS", "3")
    s = settings()
    assert (s.min_inliers, s.server.port, s.workers) == (14, 6000, 3) and "LOGO_MIN_INLIERS" in s.gate_source
    assert settings("--min-inliers", "9").min_inliers == 9
    monkeypatch.delenv("LOGO_MIN_INLIERS")
    with pytest.raises(ValueError, match="no calibrated gate"):
        settings("--calibration", str(tmp_path / "missing.json"))


def test_a_missing_artifact_fails_at_start_saying_what_to_run(tmp_path):
    with pytest.raises(RuntimeError, match="make gallery"):
        proc = start_service("logo_service", "logo_service", ["--gallery-dir", str(tmp_path / "none")],
                             log_dir=tmp_path, wait_for_port=60)
        proc.wait_healthy(timeout=60)
