"""Input defects found by probing the stack (issue 24), each reproduced against the real services."""
from __future__ import annotations

import io
import struct
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from router_service.settings import DEFAULT_GLOBAL_MODEL as GLOBAL
from tests import images

pytestmark = pytest.mark.integration


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
