"""Whole photos: the router finds the car, crops it from the upload and classifies the crop (issue 21).

Against the real stack (model server with the `localizer` model, logo service,
router): what a user sending a whole photo, or their own box, sees.
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from dataset.composites import background_paths, encode_jpeg, frame_around, iou, read_bgr, two_cars

pytestmark = pytest.mark.integration


def box_of(reply: pb.RecognizeResponse) -> np.ndarray:
    return np.array([reply.box.x_min, reply.box.y_min, reply.box.x_max, reply.box.y_max])


@pytest.fixture(scope="module")
def photos(test_photos):
    """Three test photos whose tight crop the default model answers right (the stack's own answer)."""
    return sorted(test_photos, key=lambda p: p.image_id)[:40]


@pytest.fixture(scope="module")
def answered_right(recognition, photos):
    chosen = []
    for photo in photos:
        reply = recognition.Recognize(pb.RecognizeRequest(image=photo.path.read_bytes(),
                                                          options=pb.RecognizeOptions(skip_logo=True)), timeout=60)
        if (reply.make, reply.model, reply.year) == (photo.make, photo.model, photo.year):
            chosen.append((photo, reply))
        if len(chosen) == 3:
            return chosen
    pytest.fail("the default model answered fewer than 3 of 40 test crops right")


def test_a_framed_photo_is_cropped_to_its_car_and_answered_as_the_crop(recognition, answered_right):
    background = read_bgr(background_paths("eval")[0])
    rng = np.random.default_rng(0)
    for photo, crop_reply in answered_right:
        framed = frame_around(read_bgr(photo.path), 0.6, background, rng, centred=True)
        reply = recognition.Recognize(pb.RecognizeRequest(image=encode_jpeg(framed.image),
                                                          options=pb.RecognizeOptions(skip_logo=True)), timeout=60)
        assert reply.framing == pb.FRAMING_CROPPED, reply.route_detail
        assert reply.cars_found >= 1 and 0 < reply.box_score <= 1
        assert iou(box_of(reply), framed.boxes[0]) >= 0.6, (box_of(reply), framed.boxes[0])
        assert reply.make == crop_reply.make, reply.route_detail
        assert "its box cropped" in reply.route_detail
        assert [t.stage for t in reply.timings][:2] == ["localize", "crop"]
        assert reply.car_probability > 0.2


def test_a_tight_crop_keeps_its_answer(recognition, answered_right):
    for photo, crop_reply in answered_right:
        image = photo.path.read_bytes()
        whole = recognition.Recognize(pb.RecognizeRequest(image=image, options=pb.RecognizeOptions(
            skip_logo=True, skip_localization=True)), timeout=60)
        reply = recognition.Recognize(pb.RecognizeRequest(image=image, options=pb.RecognizeOptions(skip_logo=True)),
                                      timeout=60)
        assert whole.framing == pb.FRAMING_WHOLE_PHOTO and "localisation skipped by the caller" in whole.route_detail
        assert reply.framing == pb.FRAMING_ALREADY_TIGHT, reply.route_detail
        assert list(box_of(reply)) == [0, 0, 1, 1]
        assert (reply.label, reply.confidence) == (whole.label, whole.confidence)


def test_of_two_cars_the_larger_is_answered_and_both_are_counted(recognition, answered_right):
    (photo, crop_reply), (other, _) = answered_right[0], answered_right[1]
    composite = two_cars(read_bgr(photo.path), read_bgr(other.path), 0.45, 0.55, None, np.random.default_rng(1))
    reply = recognition.Recognize(pb.RecognizeRequest(image=encode_jpeg(composite.image),
                                                      options=pb.RecognizeOptions(skip_logo=True)), timeout=60)
    assert reply.cars_found == 2, reply.route_detail
    assert "the largest of 2 cars" in reply.route_detail
    assert iou(box_of(reply), composite.boxes[0]) > iou(box_of(reply), composite.boxes[1])
    assert reply.make == crop_reply.make


def test_the_callers_box_is_classified_and_localisation_skipped(recognition, answered_right):
    photo, crop_reply = answered_right[0]
    framed = frame_around(read_bgr(photo.path), 0.5, None, np.random.default_rng(2), centred=True)
    x0, y0, x1, y1 = (float(v) for v in framed.boxes[0])
    reply = recognition.Recognize(pb.RecognizeRequest(
        image=encode_jpeg(framed.image), car_box=pb.Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
        options=pb.RecognizeOptions(skip_logo=True)), timeout=60)
    assert reply.framing == pb.FRAMING_CALLER_BOX and reply.cars_found == 0
    assert box_of(reply) == pytest.approx([x0, y0, x1, y1], abs=1e-6)
    assert "localize" not in [t.stage for t in reply.timings]
    assert reply.make == crop_reply.make


@pytest.mark.parametrize("box, says", [
    ((0.5, 0.2, 0.4, 0.9), "is empty"),
    ((0.2, 0.2, 0.2, 0.9), "is empty"),
    ((-0.1, 0.0, 0.5, 0.5), "outside the image"),
    ((0.0, 0.0, 1.5, 1.0), "outside the image"),
    ((float("nan"), 0.0, 0.5, 0.5), "not a finite number"),
    ((0.0, 0.0, 0.01, 0.01), "pixel minimum"),
])
def test_a_bad_box_is_invalid_argument_and_fails_only_its_own_batch_item(recognition, answered_right, box, says):
    image = answered_right[0][0].path.read_bytes()
    bad = pb.RecognizeRequest(image=image, image_id="bad", car_box=pb.Box(x_min=box[0], y_min=box[1], x_max=box[2],
                                                                          y_max=box[3]))
    with pytest.raises(grpc.RpcError) as caught:
        recognition.Recognize(bad, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and says in caught.value.details()
    good = pb.RecognizeRequest(image=image, image_id="good")
    results = recognition.RecognizeBatch(pb.RecognizeBatchRequest(requests=[bad, good]), timeout=60).results
    assert results[0].error.code_name == "INVALID_ARGUMENT" and says in results[0].error.message
    assert results[1].response.label


def test_listmodels_lists_the_localizer(recognition):
    listing = recognition.ListModels(pb.ListModelsRequest(), timeout=30)
    [localizer] = [m for m in listing.models if m.task == "localizer"]
    assert localizer.name == "localizer" and localizer.version >= 1 and localizer.available
    assert localizer.input_size == 256 and "EfficientNet-Lite0" in localizer.architecture
    assert all(m.task == "classifier" for m in listing.models if m is not localizer)


def test_without_its_localizer_the_router_classifies_whole_photos_and_says_why(make_router, logo_service,
                                                                                answered_right):
    router = make_router(logo_service.address, env={"ROUTER_LOCALIZER_MODEL": "no_such_localizer"})
    router.wait_healthy()
    photo, crop_reply = answered_right[0]
    with grpc.insecure_channel(router.address) as channel:
        reply = pb_grpc.RecognitionServiceStub(channel).Recognize(
            pb.RecognizeRequest(image=photo.path.read_bytes(), options=pb.RecognizeOptions(skip_logo=True)),
            timeout=60)
    assert reply.framing == pb.FRAMING_WHOLE_PHOTO and "localiser failed (NOT_FOUND)" in reply.route_detail
    assert reply.label == crop_reply.label


def test_localizer_none_turns_localisation_off(make_router, logo_service, answered_right):
    router = make_router(logo_service.address, env={"ROUTER_LOCALIZER_MODEL": "none"})
    router.wait_healthy()
    photo, crop_reply = answered_right[0]
    with grpc.insecure_channel(router.address) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        reply = stub.Recognize(pb.RecognizeRequest(image=photo.path.read_bytes(),
                                                   options=pb.RecognizeOptions(skip_logo=True)), timeout=60)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert reply.framing == pb.FRAMING_WHOLE_PHOTO and "no localiser configured" in reply.route_detail
    assert reply.label == crop_reply.label and "localize" not in {t.stage for t in reply.timings}
    assert all(m.task == "classifier" for m in listed.models)
