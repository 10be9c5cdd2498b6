"""The verdict: recognised, unknown model, unknown car or not a car (issue 22), against the real stack.

The photos are the ones the thresholds were not fitted on: the test split and
the `eval` half of ../shared/data/open_set_dev (builders/open_set.py fits on
val and the `fit` half).
"""
from __future__ import annotations

import json

import cv2
import grpc
import numpy as np
import pytest

from builders.logo_policy import latest_version
from builders.open_set import dev_photos, framed_catalogue, held_out_member
from carrecog.v1 import recognition_service_pb2 as pb
from common.model_card import read_card
from router_service.open_set import OpenSetPolicy, decide, unknown_confidence
from router_service.settings import DEFAULT_GLOBAL_MODEL, DEFAULT_OPEN_SET_FILE
from router_service.tf_serving import Prediction
from tests.test_faults import stub_for
from tests.test_stack import recognize

pytestmark = pytest.mark.integration
FITTED = json.loads(DEFAULT_OPEN_SET_FILE.read_text())
UNKNOWN = (pb.VERDICT_UNKNOWN_MODEL, pb.VERDICT_UNKNOWN_CAR)


def batch(stub, images: list[bytes]) -> list[pb.RecognizeResponse]:
    requests = [pb.RecognizeRequest(image=image, image_id=str(i)) for i, image in enumerate(images)]
    results = stub.RecognizeBatch(pb.RecognizeBatchRequest(requests=requests), timeout=300).results
    return [r.response for r in results]


def encoded(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", pixels)[1].tobytes()


@pytest.fixture(scope="module")
def dev_eval():
    return dev_photos("eval")


def test_catalogue_photos_are_recognised_as_crops_and_in_wider_photos(recognition, test_photos):
    """The verdict must not key on framing: the same cars covering 30-60 % of a larger photo keep it.

    Issue 22 asks that at most 2 % of crops and 5 % of framed photos lose VERDICT_RECOGNIZED; on the
    whole test split they lose 1.3 % and 6.9 % (`make evaluate`, docs/models.md). This guards the
    level reached on these 24: 23 crops and 22 framed photos recognised when written."""
    photos = sorted(test_photos, key=lambda p: p.image_id)[:24]
    crops = batch(recognition, [p.path.read_bytes() for p in photos])
    framed = batch(recognition, framed_catalogue(photos, "eval"))
    assert pb.VERDICT_NOT_A_CAR not in [r.verdict for r in crops]
    assert [r.verdict for r in crops].count(pb.VERDICT_RECOGNIZED) >= 22, [r.route_detail for r in crops]
    assert [r.verdict for r in framed].count(pb.VERDICT_RECOGNIZED) >= 21, [r.route_detail for r in framed]
    for reply in framed:  # the crop was shown to the localiser too, beside the classifier
        assert reply.framing == pb.FRAMING_CROPPED, reply.route_detail
        assert "localize:crop" in {t.stage for t in reply.timings}
    assert np.median([r.box_car_probability - r.car_probability for r in framed]) > 0.3  # the car, not the scene
    recognised = next(r for r in crops if r.verdict == pb.VERDICT_RECOGNIZED)
    assert recognised.verdict_score < recognised.verdict_threshold == pytest.approx(FITTED["unknown_threshold"])
    assert "verdict: recognised" in recognised.route_detail and recognised.label  # the answer stays filled


def test_photos_without_a_car_are_answered_not_a_car(recognition, dev_eval):
    not_cars = [d.path.read_bytes() for d in dev_eval if d.kind == "not_car"][:12]
    rng = np.random.default_rng(0)
    synthetic = [encoded(np.full((240, 320, 3), 255, np.uint8)), encoded(np.full((300, 300, 3), 90, np.uint8)),
                 encoded(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))]  # blank, uniform, noise
    for reply in batch(recognition, not_cars + synthetic):
        assert reply.verdict == pb.VERDICT_NOT_A_CAR, reply.route_detail
        assert reply.verdict_score >= reply.verdict_threshold == pytest.approx(FITTED["not_a_car_threshold"])
        assert "verdict: not a car" in reply.route_detail and reply.label  # make and model still filled


def test_bytes_that_are_not_an_image_stay_invalid_argument(recognition):
    with pytest.raises(grpc.RpcError) as caught:
        recognize(recognition, b"plain text, not a photo")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cars_outside_the_catalogue_are_mostly_unknown_and_never_not_a_car(recognition, dev_eval):
    cars = [d.path.read_bytes() for d in dev_eval if d.kind == "unknown_car"][:20]
    replies = batch(recognition, cars)
    verdicts = [r.verdict for r in replies]
    assert pb.VERDICT_NOT_A_CAR not in verdicts
    assert sum(v in UNKNOWN for v in verdicts) >= 4, [r.route_detail for r in replies]  # 5 of 20 when written
    flagged = next(r for r in replies if r.verdict in UNKNOWN)
    assert "the catalogue lacks" in flagged.route_detail and flagged.verdict_score >= flagged.verdict_threshold


def test_the_stream_carries_the_verdict(recognition, dev_eval, test_photos):
    not_car = next(d for d in dev_eval if d.kind == "not_car").path.read_bytes()
    photo = sorted(test_photos, key=lambda p: p.image_id)[0].path.read_bytes()
    requests = iter([pb.RecognizeStreamRequest(request=pb.RecognizeRequest(image=image, image_id=name))
                     for name, image in (("not_car", not_car), ("car", photo))])
    got = {r.result.image_id: r.result.response.verdict for r in recognition.RecognizeStream(requests, timeout=120)}
    assert got == {"not_car": pb.VERDICT_NOT_A_CAR, "car": pb.VERDICT_RECOGNIZED}


def test_listmodels_says_which_detector_and_thresholds_are_served(recognition):
    policy = recognition.ListModels(pb.ListModelsRequest(), timeout=30).open_set
    assert policy.not_a_car_model == "localizer"
    assert policy.not_a_car_threshold == pytest.approx(FITTED["not_a_car_threshold"])
    assert policy.unknown_threshold == pytest.approx(FITTED["unknown_threshold"])
    assert policy.known_make_threshold == pytest.approx(FITTED["known_make_threshold"])
    assert "open_set.json" in policy.source


def test_a_matched_logo_names_the_make_of_a_car_the_model_does_not_know(make_router, logo_service, logo_hit,
                                                                        tmp_path):
    """With every answer in doubt (unknown_threshold 0), the logo stage is asked even under the `uncertain`
    policy, and a matched logo turns the verdict into VERDICT_UNKNOWN_MODEL with its make."""
    policy = tmp_path / "open_set.json"
    policy.write_text(json.dumps(FITTED | {"unknown_threshold": 0.0}))
    router = make_router(logo_service.address, env={"ROUTER_LOGO_POLICY": "uncertain",
                                                    "ROUTER_LOGO_UNCERTAIN_BELOW": "0",
                                                    "ROUTER_OPEN_SET_FILE": str(policy)})
    router.wait_healthy()
    photo, brand = logo_hit
    channel, stub = stub_for(router)
    with channel:
        reply = recognize(stub, photo.path.read_bytes())
    assert reply.logo_consulted and reply.logo_matched and reply.logo.brand == brand
    assert reply.verdict == pb.VERDICT_UNKNOWN_MODEL and reply.make == photo.make
    assert f"the {brand} logo gives the make" in reply.route_detail


def test_without_a_policy_there_is_no_verdict_and_a_broken_one_stops_the_router(make_router, logo_service,
                                                                                test_photos, tmp_path):
    router = make_router(logo_service.address, env={"ROUTER_OPEN_SET_FILE": "none"})
    router.wait_healthy()
    channel, stub = stub_for(router)
    with channel:
        reply = recognize(stub, sorted(test_photos, key=lambda p: p.image_id)[0].path.read_bytes())
        assert reply.verdict == pb.VERDICT_UNSPECIFIED and "verdict" not in reply.route_detail
        assert not stub.ListModels(pb.ListModelsRequest(), timeout=30).HasField("open_set")
    broken = tmp_path / "open_set.json"
    broken.write_text("{}")
    with pytest.raises(RuntimeError, match="no fitted verdict thresholds"):  # exits at start, saying why
        make_router(logo_service.address, env={"ROUTER_OPEN_SET_FILE": str(broken)})


def test_the_unknown_score_reads_the_member_that_never_saw_val(tmp_path):
    """builders.open_set fits the unknown threshold on val, so the score must come from a member that did
    not train on val (the default ensemble's member 0); a model without member confidences falls back to
    its answer's confidence."""
    card = read_card(latest_version(DEFAULT_GLOBAL_MODEL))
    assert held_out_member(card) == FITTED["score_member"] == 0
    assert "--with-val" not in " ".join(card["training"]["members"][0]["commands"])
    policy = OpenSetPolicy.load(DEFAULT_OPEN_SET_FILE)
    assert "member 0's confidence" in policy.source
    sure_ensemble = Prediction(np.array([0.97, 0.03]), [], 1, "serving_default", np.array([0, 1]),
                               member_confidences=np.array([0.2, 0.99]))
    confidence, name = unknown_confidence(policy, sure_ensemble, 0.97)
    assert (confidence, name) == (0.2, "member 0's confidence")
    response = pb.RecognizeResponse(confidence=0.97, make="Audi")
    detail = decide(policy, response, False, confidence, 0.0, name)
    assert response.verdict == pb.VERDICT_UNKNOWN_CAR and "member 0's confidence 0.200" in detail
    plain = Prediction(np.array([0.97, 0.03]), [], 1, "serving_default", np.array([0, 1]))
    assert unknown_confidence(policy, plain, 0.97) == (0.97, "confidence")
