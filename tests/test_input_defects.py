"""Input defects found by probing the stack (issue 24), each reproduced against the real services."""
from __future__ import annotations

import io
import json
import struct
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from router_service.settings import DEFAULT_GLOBAL_MODEL as GLOBAL
from harness.stack import start_router
from tests import images

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def router(model_server, stack_logs):
    """A router of this module's own, without a logo stage: these defects are the model server's and the
    router's, and its log holds only this module's calls."""
    service = start_router(model_server.address, "", stack_logs / "input-defects")
    service.wait_healthy()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def recognition(router):
    with grpc.insecure_channel(router.address) as channel:
        yield pb_grpc.RecognitionServiceStub(channel)


def predict_request(encoded: list[bytes]) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = GLOBAL
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(encoded, dtype=tf.string))
    return request


def gif_with_a_big_frame(side: int) -> bytes:
    """A GIF whose screen says 16 x 16 but whose one frame is side x side (TensorFlow decodes the frame)."""
    out = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(out, "GIF")
    data = bytearray(out.getvalue())
    data[6:10] = struct.pack("<HH", 16, 16)
    return bytes(data)


def unreadable_jpeg(image_id: str) -> bytes:
    """A photo cut off mid-scan, then a stray start-of-image marker and an end-of-image marker: the headers
    pass every check (frame header, scan, end marker), and TensorFlow's decoder refuses the body."""
    return images.truncated_jpeg(image_id) + b"\xff\xd8\xff\xd9"


def test_bombs_with_bytes_after_their_end_or_big_frames_are_refused_by_the_model_server(model_server):
    bombs = {"png + 64 bytes after IEND": images.decompression_bomb_png(10_000) + bytes(64),
             "gif frame larger than its screen": gif_with_a_big_frame(5000)}
    with grpc.insecure_channel(model_server.address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        stub.Predict(predict_request([images.photo("00001")]), timeout=60)  # the graph is warm
        for name, bomb in bombs.items():
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(predict_request([images.photo("00001"), bomb]), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert "image_bytes[1]" in err.value.details() and "megapixel" in err.value.details(), name
            assert time.monotonic() - started < 1.0, name  # refused from the header, nothing decoded


def test_an_unreadable_image_fails_only_its_own_call_in_a_merged_batch(recognition):
    """Issue 24: 4 callers of good photos and 2 of unreadable ones; 289 of 430 good calls failed."""
    good = [images.photo(i) for i in ("00001", "00002", "00003", "00004")]
    bad = [unreadable_jpeg("00006"), unreadable_jpeg("00007")]
    outcomes: dict[str, list[str]] = {"good": [], "bad": []}
    stop = time.monotonic() + 3.0

    def caller(kind: str, photo: bytes) -> None:
        while time.monotonic() < stop:
            try:
                recognition.Recognize(pb.RecognizeRequest(image=photo), timeout=60)
                outcomes[kind].append("OK")
            except grpc.RpcError as exc:
                outcomes[kind].append(f"{exc.code().name}: {exc.details()}")

    threads = ([threading.Thread(target=caller, args=("good", p)) for p in good]
               + [threading.Thread(target=caller, args=("bad", p)) for p in bad])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(outcomes["good"]) >= 8 and len(outcomes["bad"]) >= 2
    assert set(outcomes["good"]) == {"OK"}, [o for o in outcomes["good"] if o != "OK"][:3]
    assert all(o.startswith("INVALID_ARGUMENT: the model could not read the image") for o in outcomes["bad"])


def bad_utf8(request: pb.RecognizeRequest, placeholder: str) -> bytes:
    """The serialized request with its string `placeholder` replaced by as many bytes of invalid UTF-8."""
    raw = request.SerializeToString()
    assert raw.count(placeholder.encode()) == 1
    return raw.replace(placeholder.encode(), b"\xff\xfe" * (len(placeholder) // 2))


def test_malformed_request_bytes_are_invalid_argument_with_a_plain_message(router, model_server):
    photo = images.photo("00001")
    malformed = {
        "image_id": bad_utf8(pb.RecognizeRequest(image=photo, image_id="PLACEHOLDER!"), "PLACEHOLDER!"),
        "force_model": bad_utf8(pb.RecognizeRequest(image=photo, options=pb.RecognizeOptions(
            force_model="PLACEHOLDER!")), "PLACEHOLDER!"),
        "truncated": pb.RecognizeRequest(image=photo, image_id="x").SerializeToString()[:len(photo) // 2],
    }
    with grpc.insecure_channel(router.address) as channel:
        recognize = channel.unary_unary("/carrecog.v1.RecognitionService/Recognize")  # bytes in, bytes out
        stream = channel.stream_stream("/carrecog.v1.RecognitionService/RecognizeStream")
        for name, raw in malformed.items():
            with pytest.raises(grpc.RpcError) as err:
                recognize(raw, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            assert err.value.details().startswith("the request could not be parsed"), name
            assert "DecodeError" not in err.value.details() and "class" not in err.value.details(), name
        valid = pb.RecognizeStreamRequest(request=pb.RecognizeRequest(image=photo)).SerializeToString()
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([valid, valid[:len(valid) // 2]]), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert recognize(pb.RecognizeRequest(image=photo).SerializeToString(), timeout=60)  # still serving
    with grpc.insecure_channel(model_server.address) as channel:
        predict = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
        with pytest.raises(grpc.RpcError) as err:
            predict(predict_request([photo]).SerializeToString()[:100], timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("the request could not be parsed")
    time.sleep(0.5)  # the log lines are written as the calls end
    lines = [json.loads(line) for line in router.log_path.read_text().splitlines() if line.strip()]
    refused = [line for line in lines if line.get("event") == "request could not be parsed"]
    assert len(refused) == 4 and {line["level"] for line in refused} == {"warning"}
    assert not [line for line in lines if line["level"] in ("error", "critical")]
    assert not [line for line in lines if line.get("code") == "UNKNOWN"]
