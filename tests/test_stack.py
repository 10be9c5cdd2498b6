"""Integration: model server, logo service and router as real processes on ephemeral ports."""
from __future__ import annotations

import json
import io

import grpc
import pytest

from carrecog.v1 import recognition_service_pb2 as pb
from client.__main__ import main as client_main
from router_service.settings import DEFAULT_GLOBAL_MODEL as GLOBAL
from tests import images
from dataset.split import load_split

pytestmark = pytest.mark.integration


def recognize(stub, data: bytes, **options) -> pb.RecognizeResponse:
    return stub.Recognize(pb.RecognizeRequest(image=data, options=pb.RecognizeOptions(**options)), timeout=60)


def test_logo_gated_route_uses_the_brand_model(recognition, logo_hit, plugins):
    photo, brand = logo_hit
    reply = recognize(recognition, photo.path.read_bytes())
    assert reply.route == pb.ROUTE_BRAND_MODEL, reply.route_detail
    assert reply.logo_matched and reply.logo.brand == brand and reply.logo.inliers > 0
    assert reply.model_name == plugins[brand].model.name and reply.model_version >= 1
    assert reply.signature_name == plugins[brand].model.signature
    assert brand in reply.route_detail
    # a brand model only knows its own brand's classes
    assert all(p.make in plugins[brand].makes for p in reply.top_k)
    assert reply.make_confidence == pytest.approx(1.0, abs=1e-5)  # a one-make brand: certain of the make
    box = reply.logo.box
    assert 0 <= box.x_min < box.x_max and 0 <= box.y_min < box.y_max
    stages = {t.stage for t in reply.timings}
    assert {"logo", "total"} <= stages and any(s.startswith("predict:") for s in stages)


def test_logo_of_a_make_without_a_model_answers_within_that_make(recognition, restricted_hit, plugins):
    photo, brand = restricted_hit
    reply = recognize(recognition, photo.path.read_bytes())
    assert reply.route == pb.ROUTE_LOGO_RESTRICTED and reply.logo_matched and reply.logo.brand == brand
    assert reply.model_name == GLOBAL and "restricted to" in reply.route_detail
    assert reply.make == photo.make and all(p.make in plugins[brand].makes for p in reply.top_k)


def test_no_logo_goes_to_the_global_model(recognition, no_logo_photo):
    reply = recognize(recognition, no_logo_photo.path.read_bytes(), top_k=7)
    assert reply.route == pb.ROUTE_GLOBAL_MODEL and reply.logo_consulted and not reply.logo_matched
    assert reply.model_name == GLOBAL
    assert len(reply.top_k) == 7
    confidences = [p.confidence for p in reply.top_k]
    assert confidences == sorted(confidences, reverse=True) and 0 < sum(confidences) <= 1.0001
    assert reply.label == f"{reply.make} {reply.model} {reply.year}"
    # the answer is its make's most probable class; the make's probability sums its classes
    assert reply.confidence == max(p.confidence for p in reply.top_k if p.make == reply.make)
    assert reply.confidence <= reply.make_confidence <= 1.0001
    assert reply.make_confidence >= sum(p.confidence for p in reply.top_k if p.make == reply.make) - 1e-5


def test_skip_logo_and_forced_model(recognition, logo_hit):
    photo, _ = logo_hit
    skipped = recognize(recognition, photo.path.read_bytes(), skip_logo=True)
    assert skipped.route == pb.ROUTE_GLOBAL_MODEL and not skipped.logo_consulted
    # an extra model (the ResNet50 "global") and a brand signature of the default model, by name
    forced = recognize(recognition, photo.path.read_bytes(), force_model="global")
    assert forced.route == pb.ROUTE_FORCED_MODEL and forced.model_name == "global"
    forced = recognize(recognition, photo.path.read_bytes(), force_model=f"{GLOBAL}:audi")
    assert forced.route == pb.ROUTE_FORCED_MODEL and forced.signature_name == "audi"
    assert {p.make for p in forced.top_k} == {"Audi"}
    with pytest.raises(grpc.RpcError) as err:
        recognize(recognition, photo.path.read_bytes(), force_model="no-such-model")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and GLOBAL in err.value.details()


def test_list_models_reads_labels_from_the_models(recognition, plugins):
    reply = recognition.ListModels(pb.ListModelsRequest(), timeout=10)
    models = {(m.name, m.signature_name): m for m in reply.models}
    default = models[(GLOBAL, "serving_default")]
    assert reply.global_model == GLOBAL and default.available
    assert len(default.labels) == 196 and default.input_key
    assert {b.slug for b in reply.brands} == set(plugins)
    assert {b.slug for b in reply.brands if b.model_name} == {"audi", "bmw", "chevrolet", "dodge", "ford", "hyundai"}
    for b in (b for b in reply.brands if b.model_name):  # every brand signature is served, knows only its brand
        brand_model = models[(b.model_name, b.signature_name)]
        assert brand_model.available and brand_model.brand == b.slug
        assert list(brand_model.makes) == sorted(plugins[b.slug].makes)
    assert models[("global", "serving_default")].available  # the ResNet50 stays reachable by name
    assert not {"audi", "bmw", "chevrolet"} & {m.name for m in reply.models if m.available}  # removed: issue 23


def test_list_models_tells_a_classifier_from_a_placeholder(recognition):
    """What each model is and how it scored on the test photos, from its model card (make evaluate)."""
    reply = recognition.ListModels(pb.ListModelsRequest(), timeout=10)
    models = {(m.name, m.signature_name): m for m in reply.models}
    default = models[(GLOBAL, "serving_default")]
    test_photos = sum(p.split == "test" for p in load_split())
    assert "EfficientNet-Lite0" in default.architecture and default.input_size == 320
    assert default.test_scores.photos == test_photos and default.test_scores.top1 > 0.8 and default.test_scores.make_top1 > 0.9
    assert 0 < default.test_scores.ece < 0.1 and not default.placeholder and default.note == "the default global model"
    # the GPU-trained ResNet50: a classifier, below the default (so never routed to), not a placeholder
    resnet = models[("global", "serving_default")]
    assert "ResNet50" in resnet.architecture and resnet.input_size == 224
    assert resnet.test_scores.photos == test_photos and 0.5 < resnet.test_scores.top1 < default.test_scores.top1
    assert not resnet.placeholder and resnet.note.startswith("test top-1")
    for brand in ("audi", "bmw", "ford"):  # brand signatures of the default are classifiers
        assert not models[(GLOBAL, brand)].placeholder and models[(GLOBAL, brand)].test_scores.photos > 0
    # which brand signatures earn their name (issue 23 §2): audi, bmw and ford answer with heads trained on
    # the brand's photos; the others restrict the global answer, and the note says which
    assert models[(GLOBAL, "audi")].note.startswith("a head trained on this brand's photos alone; test top-1")
    assert models[(GLOBAL, "chevrolet")].note.startswith("the model's global answer restricted to this brand")


BAD_INPUTS = {
    "empty": (lambda: b"", "empty"),
    "not an image": (lambda: b"%PDF-1.4 definitely not a photo", "not a JPEG or PNG"),
    "truncated jpeg": (lambda: images.truncated_jpeg("00001"), "truncated"),
    "1x1 png": (images.one_pixel_png, "too small"),
    "decompression bomb": (images.decompression_bomb_png, "megapixel"),
    "over the size limit": (lambda: b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024), "limit"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_the_stack_keeps_serving(recognition, name):
    make, words = BAD_INPUTS[name]
    with pytest.raises(grpc.RpcError) as err:
        recognize(recognition, make())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details()
    assert recognize(recognition, images.photo("00002")).label  # still serving


@pytest.mark.parametrize("make", [images.cmyk_jpeg, images.grayscale_jpeg, images.rgba_png],
                         ids=["cmyk", "grayscale", "rgba"])
def test_unusual_but_valid_images_are_recognised(recognition, make):
    reply = recognize(recognition, make("00002"))
    assert reply.label and reply.confidence > 0


def test_image_over_4_mib(recognition):
    data = images.big_png("00001")
    assert len(data) > 4 * 1024 * 1024
    reply = recognize(recognition, data)
    assert reply.label and reply.route in (pb.ROUTE_BRAND_MODEL, pb.ROUTE_GLOBAL_MODEL)


def test_batch_keeps_good_images_when_one_is_bad(recognition):
    request = pb.RecognizeBatchRequest(requests=[
        pb.RecognizeRequest(image=images.photo("00001"), image_id="good-1"),
        pb.RecognizeRequest(image=b"garbage", image_id="bad"),
        pb.RecognizeRequest(image=images.photo("00002"), image_id="good-2"),
    ])
    results = recognition.RecognizeBatch(request, timeout=120).results
    assert [r.image_id for r in results] == ["good-1", "bad", "good-2"]
    assert results[0].response.label and results[2].response.label
    assert results[1].error.code_name == "INVALID_ARGUMENT"


def test_stream_answers_in_order(recognition):
    ids = ["00003", "00004", "00006"]
    requests = (pb.RecognizeStreamRequest(request=pb.RecognizeRequest(image=images.photo(i), image_id=i)) for i in ids)
    answers = list(recognition.RecognizeStream(requests, timeout=120))
    assert [a.result.image_id for a in answers] == ids
    assert all(a.result.response.label for a in answers)


def test_request_id_is_echoed_and_propagated(recognition, router, logo_service, logo_hit):
    photo, _ = logo_hit
    reply, call = recognition.Recognize.with_call(
        pb.RecognizeRequest(image=photo.path.read_bytes()), metadata=[("x-request-id", "test-req-42")], timeout=60)
    assert reply.request_id == "test-req-42"
    assert ("x-request-id", "test-req-42") in call.trailing_metadata()
    logo_lines = [json.loads(line) for line in logo_service.log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "test-req-42" for line in logo_lines)


def test_client_prints_one_json_object_per_image(router, logo_hit, tmp_path):
    photo, _ = logo_hit
    (tmp_path / "a.jpg").write_bytes(images.photo("00001"))
    (tmp_path / "b.png").write_bytes(images.png(images.decoded("00002")))
    out = io.StringIO()
    assert client_main(["--address", router.address, str(photo.path), str(tmp_path)], out=out) == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert {"image", "make", "model", "year", "label", "confidence", "route", "top_k"} <= set(line)
    assert lines[0]["route"] == "brand_model"

