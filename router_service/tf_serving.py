"""A thin client for TensorFlow Serving's gRPC API (tensorflow-serving-api stubs).

Nothing here knows tensor names or class lists: `discover` reads them from
GetModelMetadata and the labels output of one warm-up Predict, so any model
whose `serving_default` takes encoded images (DT_STRING) and returns class
probabilities plus labels can be served without code changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

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


# An ensemble's serving_default may also serve each member's top probability ([batch, members], written by
# training/export_lite.py): the open-set verdict reads the member that never trained on val.
MEMBER_CONFIDENCES = "member_confidences"


@dataclass(frozen=True, eq=False)
class ModelMeta:
    """What one discovery learned about a served model. Immutable: a newer one replaces it whole,
    so a request that took a snapshot keeps labels and tensor keys that belong together."""

    version: int
    input_key: str
    probabilities_key: str
    labels_key: str
    member_confidences_key: str | None = None  # an ensemble's per-member confidences, when it serves them
    labels: tuple[Label, ...] = ()
    make_of_class: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # see make_index

    def with_labels(self, labels: tuple[Label, ...], version: int) -> "ModelMeta":
        return replace(self, labels=labels, make_of_class=make_index(list(labels)), version=version)


@dataclass
class ModelInfo:
    """One model the router may call and what it knows of it now. Only the catalog
    (router_service.catalog) changes `meta` and `error`, and only by replacing them."""

    name: str
    signature: str
    meta: ModelMeta | None = None
    error: str = ""

    @property
    def available(self) -> bool:
        return self.meta is not None and not self.error

    @property
    def version(self) -> int:
        return self.meta.version if self.meta else 0

    @property
    def labels(self) -> tuple[Label, ...]:
        return self.meta.labels if self.meta else ()


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray  # [C]
    labels: tuple[Label, ...] | list[Label]
    version: int
    signature: str
    make_of_class: np.ndarray  # [C] the index of each class's make, see make_index
    member_confidences: np.ndarray | None = None  # [M] each ensemble member's top probability, when served


def make_index(labels: list[Label]) -> np.ndarray:
    """For each class, a number shared by exactly the classes of the same make (computed once per
    label list, so that the per-request answer only sums probabilities)."""
    return np.unique([label.make for label in labels], return_inverse=True)[1].reshape(-1)


def _rank(info: "tf.compat.v1.TensorInfo") -> int:
    return -1 if info.tensor_shape.unknown_rank else len(info.tensor_shape.dim)


def read_signature(response: get_model_metadata_pb2.GetModelMetadataResponse, name: str,
                   signature_name: str) -> ModelMeta:
    """Input/output keys and version of `name`'s signature from a GetModelMetadata response (no labels yet)."""
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    if signature_name not in signature_map.signature_def:
        raise ModelSignatureError(
            f"model {name!r} has no signature {signature_name!r}; "
            f"it has {sorted(signature_map.signature_def)}")
    signature = signature_map.signature_def[signature_name]
    strings_in = [k for k, v in signature.inputs.items() if v.dtype == types_pb2.DT_STRING]
    if len(signature.inputs) != 1 or not strings_in:
        raise ModelSignatureError(f"model {name!r}: signature {signature_name!r} must take one "
                                  f"DT_STRING input of encoded images, it takes {sorted(signature.inputs)}")
    floats = [k for k, v in signature.outputs.items() if v.dtype == types_pb2.DT_FLOAT and _rank(v) == 2
              and k != MEMBER_CONFIDENCES]
    strings = [k for k, v in signature.outputs.items() if v.dtype == types_pb2.DT_STRING]
    if len(floats) != 1 or len(strings) != 1:
        raise ModelSignatureError(f"model {name!r}: expected one [batch, classes] float output and one "
                                  f"string labels output, got {sorted(signature.outputs)}")
    return ModelMeta(version=response.model_spec.version.value, input_key=strings_in[0],
                     probabilities_key=floats[0], labels_key=strings[0],
                     member_confidences_key=MEMBER_CONFIDENCES if MEMBER_CONFIDENCES in signature.outputs else None)


def warmup_image() -> bytes:
    """A small valid JPEG used to ask a model for its labels (and to warm it up)."""
    ok, encoded = cv2.imencode(".jpg", np.full((64, 64, 3), 127, np.uint8))
    assert ok
    return encoded.tobytes()


@dataclass(frozen=True)
class PredictReply:
    probabilities: np.ndarray  # [N, C]
    version: int
    labels: tuple[Label, ...] | None  # only when asked for
    member_confidences: np.ndarray | None = None  # [N, M], when the model serves them


class TfServingClient:
    """Predict / metadata / status calls against TF Serving (or the local stand-in). Stateless:
    what it learns it returns; the catalog keeps it."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(channel)

    async def discover(self, name: str, signature: str, timeout: float) -> ModelMeta:
        """The signature and labels of a served model, read with GetModelMetadata and one warm-up
        Predict; raises grpc.aio.AioRpcError or ModelSignatureError."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = name
        response = await self.predictions.GetModelMetadata(request, timeout=timeout, metadata=outgoing_metadata())
        meta = read_signature(response, name, signature)
        reply = await self.predict(name, signature, meta, [warmup_image()], timeout, with_labels=True)
        return meta.with_labels(reply.labels or (), reply.version)

    async def predict(self, name: str, signature: str, meta: ModelMeta, images: list[bytes],
                      timeout: float | None, with_labels: bool = False) -> PredictReply:
        """Probabilities for each encoded image, in order (and the labels when asked)."""
        wanted = [meta.probabilities_key] + ([meta.labels_key] if with_labels else []) + \
            ([meta.member_confidences_key] if meta.member_confidences_key else [])
        outputs, version = await self.predict_outputs(name, signature, meta.input_key, images, wanted, timeout)
        labels = None
        if with_labels and meta.labels_key in outputs:
            first_row = outputs[meta.labels_key][0]
            labels = tuple(Label.parse(x.decode() if isinstance(x, bytes) else str(x)) for x in first_row)
        return PredictReply(probabilities=outputs[meta.probabilities_key], version=version, labels=labels,
                            member_confidences=outputs.get(meta.member_confidences_key or ""))

    async def predict_outputs(self, name: str, signature: str, input_key: str, images: list[bytes],
                              outputs: list[str], timeout: float | None) -> tuple[dict[str, np.ndarray], int]:
        """One Predict call with encoded images: the named outputs as arrays, and the version that answered."""
        request = predict_pb2.PredictRequest()
        request.model_spec.name = name
        request.model_spec.signature_name = signature
        request.inputs[input_key].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
        request.output_filter.extend(outputs)
        response = await self.predictions.Predict(request, timeout=timeout, metadata=outgoing_metadata())
        return ({key: tf.make_ndarray(response.outputs[key]) for key in outputs if key in response.outputs},
                response.model_spec.version.value)

    async def is_available(self, name: str, timeout: float) -> bool:
        """True when GetModelStatus reports a version AVAILABLE."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = name
        response = await self.models.GetModelStatus(request, timeout=timeout, metadata=outgoing_metadata())
        return any(v.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
                   for v in response.model_version_status)
