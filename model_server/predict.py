"""Predict, GetModelMetadata and GetModelStatus as TF Serving computes them.

Plain blocking functions from a request proto to a response proto; the gRPC
servicer runs them off the event loop. Validation order and messages follow
tensorflow_serving/servables/tensorflow/predict_util.cc (RunPredict,
PreProcessPrediction), tensorflow/cc/saved_model/util.cc (GetInputValues),
servables/tensorflow/get_model_metadata_impl.cc and
model_servers/get_model_status_impl.cc. Output tensors are written into the
typed value fields (float_val, string_val, ...), as TF Serving's default
`AsProtoField` serialization does.
"""
from __future__ import annotations

from typing import Mapping

import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import error_codes_pb2, meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, predict_pb2

from common.image_headers import claimed_size
from common.images import too_many_pixels
from model_server.batch_scheduler import BatchScheduler
from model_server.errors import FailedPrecondition, InvalidArgument, NotFound
from model_server.repository import ModelRepository, Servable

DEFAULT_SIGNATURE = "serving_default"  # tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
SIGNATURE_DEF_FIELD = "signature_def"

# Tensor::AsProtoField: which repeated field holds the values of each dtype.
_VALUE_FIELD = {
    tf.float32: "float_val", tf.float64: "double_val", tf.int32: "int_val", tf.int16: "int_val",
    tf.int8: "int_val", tf.uint8: "int_val", tf.uint16: "int_val", tf.int64: "int64_val",
    tf.uint32: "uint32_val", tf.uint64: "uint64_val", tf.bool: "bool_val", tf.string: "string_val",
}


def _keys(mapping: Mapping[str, object]) -> str:
    return ",".join(sorted(mapping))


def dtype_name(dtype: int) -> str:
    """TF's DataTypeString: DT_FLOAT -> "float", DT_STRING -> "string"."""
    return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()


def tensor_to_proto(value: tf.Tensor) -> tensor_pb2.TensorProto:
    field = _VALUE_FIELD.get(value.dtype)
    array = value.numpy()
    if field is None:  # half, complex, ...: tensor_content is as valid to every client
        return tf.make_tensor_proto(array, dtype=value.dtype)
    proto = tensor_pb2.TensorProto(dtype=value.dtype.as_datatype_enum,
                                   tensor_shape=tf.TensorShape(array.shape).as_proto())
    getattr(proto, field).extend(array.ravel().tolist())
    return proto


def _input_values(signature: meta_graph_pb2.SignatureDef,
                  request: predict_pb2.PredictRequest) -> dict[str, tf.Tensor]:
    """Validated input tensors by alias (VerifyRequestInputsSize + GetInputValues)."""
    inputs, wanted = request.inputs, signature.inputs
    defaults = getattr(signature, "defaults", {})
    if len(inputs) > len(wanted) or (len(inputs) < len(wanted) and not defaults):
        raise InvalidArgument(
            f"input size does not match signature: {len(inputs)}!={len(wanted)} len({{{_keys(inputs)}}}) "
            f"!= len({{{_keys(wanted)}}}). Sent extra: {{{_keys(set(inputs) - set(wanted))}}}. "
            f"Missing but required: {{{_keys(set(wanted) - set(inputs))}}}.")
    feeds: dict[str, tf.Tensor] = {}
    for position, alias in enumerate(sorted(wanted)):
        info = wanted[alias]
        if alias in inputs:
            proto = inputs[alias]
        elif alias in defaults:
            proto = defaults[alias]
        else:
            raise InvalidArgument(
                f"Signature input alias: {alias}(feed name: {info.name}) not found in request and no default "
                f"value provided. Inputs expected to be in the request {{{_keys(inputs)}}}, or default input "
                f"alias set: {_keys(defaults)}")
        try:
            array = tf.make_ndarray(proto)
        except Exception:
            raise InvalidArgument(f"tensor parsing error: {alias}") from None
        if proto.dtype != info.dtype:
            # What Session::Run answers when a feed has the wrong dtype.
            raise InvalidArgument(f"Expects arg[{position}] to be {dtype_name(info.dtype)} "
                                  f"but {dtype_name(proto.dtype)} is provided")
        feeds[alias] = tf.constant(array, dtype=tf.as_dtype(proto.dtype))
    unused = set(inputs) - set(feeds)
    if inputs and unused:
        raise InvalidArgument(f"Inputs contains invalid name. Used request inputs: {_keys(feeds)}, "
                              f"request input: {_keys(inputs)}")
    return feeds


def _output_aliases(signature: meta_graph_pb2.SignatureDef, request: predict_pb2.PredictRequest) -> list[str]:
    seen: list[str] = []
    for alias in request.output_filter:
        if alias not in signature.outputs:
            raise InvalidArgument(f"output tensor alias not found in signature: {alias} Outputs expected to be "
                                  f"in the set {{{_keys(signature.outputs)}}}.")
        if alias in seen:
            raise InvalidArgument(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return seen or list(signature.outputs)


def check_image_sizes(feeds: dict[str, tf.Tensor], max_pixels: int) -> None:
    """Refuse an encoded image in a string input whose headers claim more than `max_pixels`.

    Not TF Serving behaviour: its graphs decode whatever they are sent, so the
    SavedModels carry the same check in-graph (training.image_guard). Here it
    costs a header read per image and refuses a decompression bomb before
    TensorFlow allocates its pixels, also for models exported without the guard.
    The headers are read as leniently as the decoders read them
    (common.image_headers): bytes after the image, or a truncated body, do not
    hide its size.
    """
    for alias, tensor in feeds.items():
        if tensor.dtype != tf.string or not max_pixels:
            continue
        for position, value in enumerate(tensor.numpy().ravel()):
            claim = claimed_size(value) if isinstance(value, bytes) else None
            if claim is not None and claim.pixels > max_pixels:
                raise InvalidArgument(f"{alias}[{position}]: {too_many_pixels(claim, max_pixels)}")


def predict(repository: ModelRepository, request: predict_pb2.PredictRequest,
            batcher: BatchScheduler | None = None, max_image_pixels: int = 0) -> predict_pb2.PredictResponse:
    if not request.HasField("model_spec"):
        raise InvalidArgument("Missing ModelSpec")
    return run_predict(repository.resolve(request.model_spec), request, batcher, max_image_pixels)


def run_predict(servable: Servable, request: predict_pb2.PredictRequest, batcher: BatchScheduler | None = None,
                max_image_pixels: int = 0) -> predict_pb2.PredictResponse:
    """Predict on one servable (predict_util.cc RunPredict); also what warm-up replays."""
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = servable.signature_defs.get(signature_name)
    function = servable.functions.get(signature_name)
    if signature is None or function is None:
        raise FailedPrecondition(f'Serving signature key "{signature_name}" not found.')
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.signature_name = signature_name
    response.model_spec.version.value = servable.version
    feeds = _input_values(signature, request)
    check_image_sizes(feeds, max_image_pixels)
    aliases = _output_aliases(signature, request)
    # A TF runtime error (e.g. an undecodable image) propagates as tf.errors.*.
    outputs = (batcher.run((servable.name, servable.version, signature_name), function, feeds) if batcher
               else function(**feeds))
    for alias in aliases:
        response.outputs[alias].CopyFrom(tensor_to_proto(outputs[alias]))
    return response


def _servable_for_metadata(repository: ModelRepository,
                           request: get_model_metadata_pb2.GetModelMetadataRequest) -> Servable:
    if not request.HasField("model_spec"):
        raise InvalidArgument("Missing ModelSpec")
    if not request.metadata_field:
        raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
    for field in request.metadata_field:
        if field != SIGNATURE_DEF_FIELD:
            raise InvalidArgument(f"Metadata field {field} is not supported")
    return repository.resolve(request.model_spec)


def get_model_metadata(repository: ModelRepository, request: get_model_metadata_pb2.GetModelMetadataRequest
                       ) -> get_model_metadata_pb2.GetModelMetadataResponse:
    servable = _servable_for_metadata(repository, request)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in servable.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def get_model_status(repository: ModelRepository, request: get_model_status_pb2.GetModelStatusRequest
                     ) -> get_model_status_pb2.GetModelStatusResponse:
    if not request.HasField("model_spec"):
        raise InvalidArgument("Missing ModelSpec")
    spec = request.model_spec
    states = repository.version_states(spec.name)
    if spec.HasField("version"):  # a version_label is ignored here, as in TF Serving
        wanted = spec.version.value
        if wanted not in states:
            raise NotFound(f"Could not find version {wanted} of model {spec.name}")
        states = {wanted: states[wanted]}
    elif not states:
        raise NotFound(f"Could not find any versions of model {spec.name}")
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state in states.items():
        status = response.model_version_status.add(version=version, state=state.state)
        status.status.SetInParent()  # present even when OK, as TF Serving's ToStatusProto(OkStatus())
        if state.error:
            status.status.error_code = error_codes_pb2.UNKNOWN
            status.status.error_message = state.error
    return response
