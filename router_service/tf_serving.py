"""A thin client for TensorFlow Serving's gRPC API (tensorflow-serving-api stubs).

Nothing here knows tensor names or class lists: `discover` reads them from
GetModelMetadata and the labels output of one warm-up Predict, so any model
whose `serving_default` takes encoded images (DT_STRING) and returns class
probabilities plus labels can be served without code changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from common.channels import outgoing_metadata


class ModelSignatureError(RuntimeError):
    """The model's signature does not look like an encoded-image classifier."""


@dataclass(frozen=True)
class Label:
    """One class; labels travel with the model as "<make>|<model>|<year>"."""

    text: str
    make: str
    model: str
    year: int

    @classmethod
    def parse(cls, raw: str) -> "Label":
        parts = raw.split("|")
        if len(parts) == 3:
            make, model, year = parts
            return cls(text=f"{make} {model} {year}".strip(), make=make, model=model,
                       year=int(year) if year.isdigit() else 0)
        return cls(text=raw, make="", model=raw, year=0)  # a model with plain labels still works


@dataclass
class ModelInfo:
    """What the router learned about one served model at start."""

    name: str
    signature: str
    version: int = 0
    input_key: str = ""
    probabilities_key: str = ""
    labels_key: str = ""
    labels: list[Label] = field(default_factory=list)
    make_of_class: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # see make_index
    available: bool = False
    error: str = ""


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # [C]
    labels: list[Label]
    version: int
    signature: str
    make_of_class: np.ndarray  # [C] the index of each class's make, see make_index


def make_index(labels: list[Label]) -> np.ndarray:
    """For each class, a number shared by exactly the classes of the same make (computed once per
    label list, so that the per-request answer only sums probabilities)."""
    return np.unique([label.make for label in labels], return_inverse=True)[1].reshape(-1)


def _rank(info: "tf.compat.v1.TensorInfo") -> int:
    return -1 if info.tensor_shape.unknown_rank else len(info.tensor_shape.dim)


def read_signature(response: get_model_metadata_pb2.GetModelMetadataResponse, model: ModelInfo) -> None:
    """Fill input/output keys of `model` from a GetModelMetadata response."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    if model.signature not in signature_map.signature_def:
        raise ModelSignatureError(
            f"model {model.name!r} has no signature {model.signature!r}; "
            f"it has {sorted(signature_map.signature_def)}")
    signature = signature_map.signature_def[model.signature]
    strings_in = [k for k, v in signature.inputs.items() if v.dtype == types_pb2.DT_STRING]
    if len(signature.inputs) != 1 or not strings_in:
        raise ModelSignatureError(f"model {model.name!r}: signature {model.signature!r} must take one "
                                  f"DT_STRING input of encoded images, it takes {dict(signature.inputs)}")
    floats = [k for k, v in signature.outputs.items() if v.dtype == types_pb2.DT_FLOAT and _rank(v) == 2]
    strings = [k for k, v in signature.outputs.items() if v.dtype == types_pb2.DT_STRING]
    if len(floats) != 1 or len(strings) != 1:
        raise ModelSignatureError(f"model {model.name!r}: expected one [batch, classes] float output and one "
                                  f"string labels output, got {sorted(signature.outputs)}")
    model.input_key, model.probabilities_key, model.labels_key = strings_in[0], floats[0], strings[0]
    model.version = response.model_spec.version.value


def warmup_image() -> bytes:
    """A small valid JPEG used to ask a model for its labels (and to warm it up)."""
    ok, encoded = cv2.imencode(".jpg", np.full((64, 64, 3), 127, np.uint8))
    assert ok
    return encoded.tobytes()


class TfServingClient:
    """Predict / metadata / status calls against TF Serving (or the local stand-in)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    async def discover(self, model: ModelInfo, timeout: float) -> None:
        """Read the signature and labels of `model`; marks it available, or raises grpc.aio.AioRpcError."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = model.name
        response = await self.predictions.GetModelMetadata(request, timeout=timeout, metadata=outgoing_metadata())
        read_signature(response, model)
        model.labels = []  # the warm-up Predict below fetches them
        await self.predict(model, [warmup_image()], timeout=timeout)
        model.available, model.error = True, ""

    async def predict(self, model: ModelInfo, images: list[bytes], timeout: float | None) -> list[Prediction]:
        """Probabilities for each encoded image, in order, labelled with the model's labels.

        Labels are learned once (at discovery) rather than parsed on every call;
        they are fetched again only when the server answers with a version other
        than the one they came from, since a new version may have new classes.
        """
        response = await self._predict(model, images, timeout, with_labels=not model.labels)
        version = response.model_spec.version.value
        if model.labels and version != model.version:
            response = await self._predict(model, images, timeout, with_labels=True)
            version = response.model_spec.version.value
        if model.labels_key in response.outputs:
            first_row = tf.make_ndarray(response.outputs[model.labels_key])[0]
            model.labels = [Label.parse(x.decode() if isinstance(x, bytes) else str(x)) for x in first_row]
            model.make_of_class = make_index(model.labels)
            model.version = version
        probabilities = tf.make_ndarray(response.outputs[model.probabilities_key])
        return [Prediction(probabilities=row, labels=model.labels, version=version, signature=model.signature,
                           make_of_class=model.make_of_class) for row in probabilities]

    async def _predict(self, model: ModelInfo, images: list[bytes], timeout: float | None,
                       with_labels: bool) -> predict_pb2.PredictResponse:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model.name
        request.model_spec.signature_name = model.signature
        request.inputs[model.input_key].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
        request.output_filter.append(model.probabilities_key)
        if with_labels:
            request.output_filter.append(model.labels_key)
        return await self.predictions.Predict(request, timeout=timeout, metadata=outgoing_metadata())

    async def is_available(self, name: str, timeout: float) -> bool:
        """True when GetModelStatus reports a version AVAILABLE."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        response = await self.models.GetModelStatus(request, timeout=timeout, metadata=outgoing_metadata())
        return any(v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
                   for v in response.model_version_status)
