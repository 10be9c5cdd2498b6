"""`--enable_batching` / `--batching_parameters_file`, read as TF Serving reads them.

The file is a text-format `tensorflow.serving.BatchingParameters` (declared in
tensorflow_serving/servables/tensorflow/session_bundle_config.proto). The
tensorflow-serving-api wheel does not ship that message, so it is declared here
from the same field names and types; only text format is read, so field numbers
do not matter.

model_server.batch_scheduler batches Predict calls with these parameters.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory, wrappers_pb2

from model_server.config import ConfigError, read_text_proto

_FIELDS = (  # (name, label, type, wrapper message or None)
    ("max_batch_size", "optional", "message", "Int64Value"),
    ("batch_timeout_micros", "optional", "message", "Int64Value"),
    ("max_enqueued_batches", "optional", "message", "Int64Value"),
    ("num_batch_threads", "optional", "message", "Int64Value"),
    ("thread_pool_name", "optional", "message", "StringValue"),
    ("allowed_batch_sizes", "repeated", "int64", None),
    ("pad_variable_length_inputs", "optional", "bool", None),
    ("enable_large_batch_splitting", "optional", "message", "BoolValue"),
    ("max_execution_batch_size", "optional", "message", "Int64Value"),
)

_LABELS = {"optional": descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
           "repeated": descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED}
_TYPES = {"message": descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
          "int64": descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
          "bool": descriptor_pb2.FieldDescriptorProto.TYPE_BOOL}


def _batching_parameters_class() -> type[message.Message]:
    pool = descriptor_pool.DescriptorPool()  # private: never clashes with the default pool
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name="carrecog/model_server/batching_parameters.proto", package="tensorflow.serving",
        syntax="proto3", dependency=[wrappers.name])
    proto = file.message_type.add(name="BatchingParameters")
    for number, (name, label, kind, wrapper) in enumerate(_FIELDS, start=1):
        proto.field.add(name=name, number=number, label=_LABELS[label], type=_TYPES[kind],
                        type_name=f".google.protobuf.{wrapper}" if wrapper else None)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


BatchingParameters = _batching_parameters_class()


def read_batching_parameters(enable_batching: bool, path: str | None) -> message.Message | None:
    """The batching parameters in effect, or None when batching is off."""
    if not enable_batching:
        if path:
            # TF Serving refuses this combination at start-up too.
            raise ConfigError("You supplied --batching_parameters_file without --enable_batching")
        return None
    params = BatchingParameters()
    if not path:
        params.thread_pool_name.value = "model_server_batch_threads"  # TF Serving's default
        return params
    read_text_proto(Path(path), params)
    sizes = list(params.allowed_batch_sizes)
    if sizes:
        if sizes != sorted(set(sizes)):
            raise ConfigError("allowed_batch_sizes entries must be monotonically increasing")
        if params.HasField("max_batch_size") and sizes[-1] != params.max_batch_size.value:
            raise ConfigError("final entry in allowed_batch_sizes must equal max_batch_size")
    return params
