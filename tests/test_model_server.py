"""model_server: a real server process on port 0, called with tensorflow-serving-api stubs.

The models are real SavedModels exported here: they decode JPEG bytes in-graph,
resize to 8x8, apply a fixed dense layer and a softmax, with TF Serving's
signature shape (image_bytes DT_STRING [-1] -> probabilities, labels).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, get_model_status_pb2, model_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_log_pb2,
                                     prediction_service_pb2_grpc)

from model_server.settings import build_parser
from tests import images
from model_server.batch_scheduler import BatchScheduler
from model_server.batching import BatchingParameters, read_batching_parameters
from model_server.errors import InvalidArgument, Unavailable
from model_server.config import (ConfigError, find_versions, load_model_server_config, local_base_path,
                                 parse_prefix_map, plan_models)
from model_server import predict as predict_module, warmup as warmup_module
from model_server.repository import LoadError, ModelRepository, read_meta_graph
from model_server.warmup import WARMUP_FILE, run_warmup
from training.warmup import write_warmup_requests

REPO = Path(__file__).resolve().parents[1]
PHOTOS = images.PHOTOS
LABELS = ["Audi A4 2012", "BMW M3 2011", "Ford F-150 2010"]
Code = grpc.StatusCode
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE

CONFIG = """
model_config_list {
  config { name: "cars" base_path: "/models/cars" model_platform: "tensorflow" }
  config {
    name: "cars_all" base_path: "/models/cars" model_platform: "tensorflow"
    model_version_policy { all {} }
    version_labels { key: "stable" value: 1 }
    version_labels { key: "canary" value: 2 }
  }
}
"""
BATCHING = "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 2000 }\nnum_batch_threads { value: 2 }\n"


class TinyCarModel(tf.Module):
    def __init__(self, bias: list[float]) -> None:
        super().__init__()
        weights = np.random.default_rng(0).normal(size=(8 * 8 * 3, len(LABELS))).astype(np.float32)
        self.weights = tf.Variable(weights)
        self.bias = tf.Variable(bias, dtype=tf.float32)
        self.labels = tf.constant(LABELS)

    def _probabilities(self, image_bytes: tf.Tensor) -> tf.Tensor:
        def one(encoded: tf.Tensor) -> tf.Tensor:
            image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
            image.set_shape([None, None, 3])
            return tf.image.resize(tf.cast(image, tf.float32), [8, 8]) / 255.0

        pixels = tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([8, 8, 3], tf.float32))
        return tf.nn.softmax(tf.reshape(pixels, [-1, 8 * 8 * 3]) @ self.weights + self.bias)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(self, image_bytes):
        labels = tf.tile(self.labels[tf.newaxis], [tf.shape(image_bytes)[0], 1])
        return {"probabilities": self._probabilities(image_bytes), "labels": labels}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def top_label(self, image_bytes):
        return {"label": tf.gather(self.labels, tf.argmax(self._probabilities(image_bytes), axis=1))}


def export(path: Path, bias: list[float]) -> None:
    model = TinyCarModel(bias)
    tf.saved_model.save(model, str(path), signatures={"serving_default": model.serve, "top_label": model.top_label})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_server")
    export(root / "models" / "cars" / "1", [5.0, 0.0, 0.0])
    export(root / "models" / "cars" / "2", [0.0, 0.0, 5.0])
    (root / "models" / "cars" / "not-a-version").mkdir()
    (root / "models.config").write_text(CONFIG)
    (root / "batching.txt").write_text(BATCHING)
    port_file = root / "port"
    command = [sys.executable, "-m", "model_server", f"--model_config_file={root / 'models.config'}",
               "--model_base_path_prefix_map", f"/models={root / 'models'}", "--host", "127.0.0.1",
               "--port=0", "--port-file", str(port_file), "--rest_api_port=8501", "--enable_batching",
               f"--batching_parameters_file={root / 'batching.txt'}", "--allow_version_labels_for_unavailable_models",
               "--reflection"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"model server did not start: {process.stderr.read()}")
        time.sleep(0.1)
    channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text()}")
    health = health_pb2_grpc.HealthStub(channel)
    while health.Check(health_pb2.HealthCheckRequest()).status != health_pb2.HealthCheckResponse.SERVING:
        assert process.poll() is None and time.monotonic() < deadline, "model server never became SERVING"
        time.sleep(0.1)
    yield channel
    channel.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0  # graceful shutdown
    process.stderr.close()


@pytest.fixture(scope="module")
def predictions(server):
    return prediction_service_pb2_grpc.PredictionServiceStub(server)


@pytest.fixture(scope="module")
def models(server):
    return model_service_pb2_grpc.ModelServiceStub(server)


def photos(n: int = 2) -> list[bytes]:
    return [path.read_bytes() for path in sorted(PHOTOS.glob("*.jpg"))[:n]]


def predict_request(model: str = "cars", images: list[bytes] | None = None, **spec) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for key, value in spec.items():
        if key == "version":
            request.model_spec.version.value = value
        else:
            setattr(request.model_spec, key, value)
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images if images is not None else photos()))
    return request


def rpc_error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    return info.value


def test_health_is_serving_for_the_server_and_each_service(server):
    health = health_pb2_grpc.HealthStub(server)
    for service in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_tf_servings_services(server):
    pool = DescriptorPool(ProtoReflectionDescriptorDatabase(server))
    methods = {m.name for m in pool.FindServiceByName("tensorflow.serving.PredictionService").methods}
    assert {"Predict", "GetModelMetadata"} <= methods
    assert "GetModelStatus" in {m.name for m in pool.FindServiceByName("tensorflow.serving.ModelService").methods}


def test_predict_a_batch_of_real_photos_with_the_latest_version(predictions):
    response = predictions.Predict(predict_request(), timeout=30)
    assert (response.model_spec.name, response.model_spec.version.value) == ("cars", 2)
    assert response.model_spec.signature_name == "serving_default"  # empty in the request
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    labels = tf.make_ndarray(response.outputs["labels"])
    assert probabilities.shape == (2, 3) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert labels.shape == (2, 3) and [label.decode() for label in labels[0]] == LABELS
    assert len(response.outputs["probabilities"].float_val) == 6  # typed fields, as TF Serving writes them


def test_latest_policy_loads_only_the_newest_version(predictions, models):
    error = rpc_error(predictions.Predict, predict_request(version=1))
    assert error.code() == Code.NOT_FOUND
    assert error.details() == "Servable not found for request: Specific(cars, 1)"
    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "cars"}))
    assert [(s.version, s.state) for s in status.model_version_status] == [(2, AVAILABLE)]


def test_pinned_version_and_version_labels(predictions, models):
    v1 = predictions.Predict(predict_request("cars_all", version=1), timeout=30)
    v2 = predictions.Predict(predict_request("cars_all", version=2), timeout=30)
    assert (v1.model_spec.version.value, v2.model_spec.version.value) == (1, 2)
    assert not np.allclose(tf.make_ndarray(v1.outputs["probabilities"]),
                           tf.make_ndarray(v2.outputs["probabilities"]))
    stable = predictions.Predict(predict_request("cars_all", version_label="stable"), timeout=30)
    assert stable.model_spec.version.value == 1
    error = rpc_error(predictions.Predict, predict_request("cars_all", version_label="nope"))
    assert (error.code(), error.details()) == (Code.INVALID_ARGUMENT, "Unrecognized servable version label: nope")
    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "cars_all"}))
    assert [(s.version, s.state) for s in status.model_version_status] == [(2, AVAILABLE), (1, AVAILABLE)]


def test_signature_selection_and_output_filter(predictions):
    response = predictions.Predict(predict_request(signature_name="top_label"), timeout=30)
    assert response.model_spec.signature_name == "top_label"
    assert [label.decode() for label in tf.make_ndarray(response.outputs["label"])] == [LABELS[2]] * 2
    request = predict_request()
    request.output_filter.append("labels")
    assert set(predictions.Predict(request, timeout=30).outputs) == {"labels"}
    request.output_filter.append("logits")
    error = rpc_error(predictions.Predict, request)
    assert error.code() == Code.INVALID_ARGUMENT
    assert error.details().startswith("output tensor alias not found in signature: logits")


def test_get_model_metadata_returns_the_signature_def_map(predictions):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "cars"
    response = predictions.GetModelMetadata(request, timeout=30)
    assert (response.model_spec.name, response.model_spec.version.value) == ("cars", 2)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    assert {"serving_default", "top_label"} <= set(signature_map.signature_def)
    signature = signature_map.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    tensor = signature.inputs["image_bytes"]
    assert (tensor.dtype, [d.size for d in tensor.tensor_shape.dim]) == (tf.string.as_datatype_enum, [-1])
    assert set(signature.outputs) == {"probabilities", "labels"}
    probabilities, labels = signature.outputs["probabilities"], signature.outputs["labels"]
    assert (probabilities.dtype, [d.size for d in probabilities.tensor_shape.dim]) == (tf.float32.as_datatype_enum,
                                                                                        [-1, 3])
    assert (labels.dtype, [d.size for d in labels.tensor_shape.dim]) == (tf.string.as_datatype_enum, [-1, 3])


def test_get_model_metadata_needs_a_supported_field(predictions):
    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec={"name": "cars"})
    error = rpc_error(predictions.GetModelMetadata, request)
    assert error.code() == Code.INVALID_ARGUMENT
    request.metadata_field.append("graph")
    assert rpc_error(predictions.GetModelMetadata, request).details() == "Metadata field graph is not supported"


def test_unknown_model_and_version_are_not_found(predictions, models):
    error = rpc_error(predictions.Predict, predict_request("nope"))
    assert (error.code(), error.details()) == (Code.NOT_FOUND, "Servable not found for request: Latest(nope)")
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name, request.model_spec.version.value = "cars", 7
    error = rpc_error(predictions.GetModelMetadata, request)
    assert (error.code(), error.details()) == (Code.NOT_FOUND, "Servable not found for request: Specific(cars, 7)")
    error = rpc_error(models.GetModelStatus, get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"}))
    assert (error.code(), error.details()) == (Code.NOT_FOUND, "Could not find any versions of model nope")


def test_unknown_signature_is_failed_precondition(predictions):
    error = rpc_error(predictions.Predict, predict_request(signature_name="classify"))
    assert (error.code(), error.details()) == (Code.FAILED_PRECONDITION,
                                               'Serving signature key "classify" not found.')


def test_bytes_that_are_not_an_image_are_invalid_argument(predictions):
    error = rpc_error(predictions.Predict, predict_request(images=[b"this is not a photo"]))
    assert error.code() == Code.INVALID_ARGUMENT
    assert "Unknown image file format" in error.details()  # TensorFlow's own message
    assert "[Op:" not in error.details()


def test_wrong_input_key_or_dtype_is_invalid_argument(predictions):
    request = predict_request()
    request.inputs["image"].CopyFrom(request.inputs.pop("image_bytes"))
    error = rpc_error(predictions.Predict, request)
    assert error.code() == Code.INVALID_ARGUMENT
    assert error.details().startswith("Signature input alias: image_bytes(feed name: serving_default_image_bytes:0)"
                                      " not found in request")
    request.inputs["image_bytes"].CopyFrom(request.inputs["image"])
    error = rpc_error(predictions.Predict, request)
    assert error.details() == ("input size does not match signature: 2!=1 len({image,image_bytes}) != "
                               "len({image_bytes}). Sent extra: {image}. Missing but required: {}.")
    request = predict_request()
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([1.0, 2.0], dtype=tf.float32))
    error = rpc_error(predictions.Predict, request)
    assert error.code() == Code.INVALID_ARGUMENT
    assert error.details() == "Expects arg[0] to be string but float is provided"


def test_concurrent_calls_are_batched_and_each_gets_its_own_rows(predictions):
    images = photos(6)
    alone = [tf.make_ndarray(predictions.Predict(predict_request(images=[image]), timeout=30).outputs["probabilities"])
             for image in images]
    with ThreadPoolExecutor(len(images)) as pool:
        together = list(pool.map(lambda image: predictions.Predict(predict_request(images=[image]), timeout=30),
                                 images))
    for single, response in zip(alone, together):
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), single, rtol=1e-5)
    error = rpc_error(predictions.Predict, predict_request(images=photos(9)))  # max_batch_size is 8
    assert (error.code(), error.details()) == (Code.INVALID_ARGUMENT,
                                               "Task size 9 is larger than maximum input batch size 8")


def test_other_prediction_methods_are_unimplemented(predictions):
    error = rpc_error(predictions.Classify, classification_pb2.ClassificationRequest(model_spec={"name": "cars"}))
    assert error.code() == Code.UNIMPLEMENTED


# Configuration, in process: no TensorFlow model needed.

def test_prefix_map_rewrites_container_base_paths(tmp_path):
    prefix_map = parse_prefix_map([f"/models={tmp_path}", f"/models/special={tmp_path / 'x'}"])
    assert local_base_path("/models/global", prefix_map) == tmp_path / "global"
    assert local_base_path("/models/special/a", prefix_map) == tmp_path / "x" / "a"
    assert local_base_path("/modelsX/a", prefix_map) == Path("/modelsX/a")  # whole components only
    with pytest.raises(ConfigError):
        parse_prefix_map(["/models"])


def test_version_policies_pick_numeric_folders(tmp_path):
    for name in ("1", "2", "10", "tmp", "3.bak"):
        (tmp_path / "m" / name).mkdir(parents=True)
    assert sorted(find_versions(tmp_path / "m")) == [1, 2, 10]
    config_file = tmp_path / "models.config"
    config_file.write_text("""model_config_list {
      config { name: "latest" base_path: "/models/m" model_platform: "tensorflow" }
      config { name: "two" base_path: "/models/m" model_platform: "tensorflow"
               model_version_policy { latest { num_versions: 2 } } }
      config { name: "specific" base_path: "/models/m" model_platform: "tensorflow"
               model_version_policy { specific { versions: 1 versions: 7 } } }
      config { name: "all" base_path: "/models/m" model_platform: "tensorflow" model_version_policy { all {} } }
    }""")
    plans = plan_models(load_model_server_config(config_file), parse_prefix_map([f"/models={tmp_path}"]))
    assert {plan.name: sorted(plan.versions) for plan in plans} == {
        "latest": [10], "two": [2, 10], "specific": [1], "all": [1, 2, 10]}


@pytest.mark.parametrize("config, message", [
    ('config { name: "a" base_path: "/m" model_platform: "tensorflow" } '
     'config { name: "a" base_path: "/m" model_platform: "tensorflow" }',
     "Illegal to list model a multiple times in config list"),
    ('config { name: "a" base_path: "m" model_platform: "tensorflow" }',
     "Expected model a to have an absolute path or URI; got base_path()=m"),
    ('config { name: "a" base_path: "/nowhere" model_platform: "tensorflow" }',
     "Could not find base path"),
    ('config { name: "a" base_path: "/m" model_platform: "tensorflow" version_labels { key: "s" value: 1 } }',
     "Request to assign label to version 1 of model a, which is not currently available for inference"),
    ('config { name: "a" base_path: "/m" model_platform: "tensorflow" bogus: 1 }', "Invalid protobuf file"),
])
def test_bad_configs_fail_at_start_with_tf_servings_message(tmp_path, config, message):
    (tmp_path / "m" / "1").mkdir(parents=True)
    config_file = tmp_path / "models.config"
    config_file.write_text(f"model_config_list {{ {config} }}")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_models(load_model_server_config(config_file), parse_prefix_map([f"/m={tmp_path / 'm'}"]))


def test_batching_flags_are_checked_like_tf_serving(tmp_path):
    params_file = tmp_path / "batching.txt"
    params_file.write_text(BATCHING + "allowed_batch_sizes: 4\nallowed_batch_sizes: 8\n")
    params = read_batching_parameters(True, str(params_file))
    assert (params.max_batch_size.value, list(params.allowed_batch_sizes)) == (8, [4, 8])
    with pytest.raises(ConfigError, match="without --enable_batching"):
        read_batching_parameters(False, str(params_file))
    params_file.write_text("max_batch_sizes { value: 8 }")
    with pytest.raises(ConfigError, match="Invalid protobuf file"):
        read_batching_parameters(True, str(params_file))


def test_tf_serving_command_line_is_accepted():
    args = build_parser().parse_args([
        "--port=8500", "--rest_api_port=8501", "--model_config_file=/models/models.config",
        "--enable_batching", "--batching_parameters_file=/models/batching_parameters.txt"])
    assert (args.port, args.rest_api_port, args.enable_batching) == (8500, 8501, True)
    assert build_parser().parse_args(["--model_base_path=/m", "--enable_batching=false"]).enable_batching is False
    assert build_parser().parse_args(["--model_base_path=/m"]).model_name == "default"


def test_a_bad_config_fails_fast_naming_the_problem(tmp_path):
    result = subprocess.run([sys.executable, "-m", "model_server", f"--model_base_path={tmp_path / 'none'}",
                             "--port=0"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"Could not find base path {tmp_path / 'none'} for servable default" in result.stderr


# Batching, in process, with a recording function in place of a model.

def scheduler(text: str) -> BatchScheduler:
    from google.protobuf import text_format
    return BatchScheduler(text_format.Parse(text, BatchingParameters()))


def test_batch_scheduler_merges_pads_and_splits():
    batcher = scheduler("max_batch_size { value: 8 } batch_timeout_micros { value: 300000 } "
                        "allowed_batch_sizes: 4 allowed_batch_sizes: 8")
    seen = []

    def double(x):
        seen.append(int(x.shape[0]))
        return {"y": x * 2}

    start = threading.Barrier(3)

    def call(value: int):
        start.wait()
        return batcher.run("m", double, {"x": tf.constant([value, value + 100])})["y"].numpy().tolist()

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(call, [1, 2, 3]))
    assert results == [[2, 202], [4, 204], [6, 206]]
    assert seen == [8]  # 3 calls x 2 rows, padded up to the allowed size 8


def test_batch_scheduler_refuses_work_beyond_its_queue():
    batcher = scheduler("max_batch_size { value: 1 } max_enqueued_batches { value: 1 } num_batch_threads { value: 1 }")
    running, release = threading.Event(), threading.Event()

    def slow(x):
        running.set()
        release.wait(10)
        return {"y": x}

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batcher.run, "m", slow, {"x": tf.constant([1])})
        assert running.wait(10)
        second = pool.submit(batcher.run, "m", slow, {"x": tf.constant([2])})  # waits in the queue
        time.sleep(0.2)
        with pytest.raises(Unavailable, match="queue to which this task was submitted is full"):
            batcher.run("m", slow, {"x": tf.constant([3])})
        release.set()
        assert (first.result()["y"].numpy().tolist(), second.result()["y"].numpy().tolist()) == ([1], [2])
    with pytest.raises(InvalidArgument, match="at least one dimension"):
        batcher.run("m", slow, {"x": tf.constant(1)})


def test_one_calls_bad_input_fails_only_that_call_of_a_merged_batch():
    batcher = scheduler("max_batch_size { value: 8 } batch_timeout_micros { value: 300000 }")
    seen = []

    def strict(x):  # fails the whole batch when any row is negative, as a decode op fails on one bad image
        seen.append(x.numpy().tolist())
        tf.debugging.assert_non_negative(x, message="unreadable row")
        return {"y": x * 2}

    values = [1, 2, -3, 4, 5, 6]
    start = threading.Barrier(len(values))

    def call(value: int):
        start.wait()
        try:
            return batcher.run("m", strict, {"x": tf.constant([value])})["y"].numpy().tolist()
        except tf.errors.InvalidArgumentError as exc:
            return exc

    with ThreadPoolExecutor(len(values)) as pool:
        results = list(pool.map(call, values))
    assert [r for r in results if not isinstance(r, Exception)] == [[2], [4], [8], [10], [12]]
    assert isinstance(results[2], tf.errors.InvalidArgumentError) and "unreadable row" in str(results[2])
    assert len(seen[0]) == 6 and [-3] in seen  # merged first, then split down to the bad call alone
    assert len(seen) <= 1 + 2 * 3  # halves only: at most two runs per level below the merged one


# SavedModel warm-up (assets.extra/tf_serving_warmup_requests), in process.

def warmup_repository(tmp_path: Path, records: list | None = None) -> tuple[ModelRepository, Path]:
    """A repository over one exported version of "cars", with warm-up; `records` replace the exported ones."""
    export(tmp_path / "cars" / "1", [5.0, 0.0, 0.0])
    version = tmp_path / "cars" / "1"
    if records is None:
        write_warmup_requests(version, "cars", ["serving_default", "top_label"])
    else:
        (version / WARMUP_FILE).parent.mkdir(parents=True, exist_ok=True)
        with tf.io.TFRecordWriter(str(version / WARMUP_FILE)) as writer:
            for record in records:
                writer.write(record)
    config = load_model_server_config_text(tmp_path, 'config { name: "cars" base_path: "/models/cars" '
                                                     'model_platform: "tensorflow" }')
    plans = plan_models(config, parse_prefix_map([f"/models={tmp_path}"]))
    return ModelRepository(plans, warmup=run_warmup), version


def load_model_server_config_text(tmp_path: Path, configs: str):
    (tmp_path / "models.config").write_text(f"model_config_list {{ {configs} }}")
    return load_model_server_config(tmp_path / "models.config")


def test_warmup_records_are_replayed_before_the_version_is_available(tmp_path):
    repository, version = warmup_repository(tmp_path)
    replayed = []

    def recording(servable, request, **kwargs):
        replayed.append((request.model_spec.signature_name, repository.version_states("cars")[1].state))
        return predict_module.run_predict(servable, request, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(warmup_module, "run_predict", recording)
        repository.load_all()
    loading = get_model_status_pb2.ModelVersionStatus.LOADING
    assert sorted(replayed) == [("serving_default", loading), ("top_label", loading)]
    assert repository.version_states("cars")[1].state == AVAILABLE
    # the file is optional: a version without one loads as before
    (version / WARMUP_FILE).unlink()
    assert run_warmup(repository.resolve(model_pb2.ModelSpec(name="cars")), version) == 0


@pytest.mark.parametrize("kind, message", [
    ("unknown signature", 'Serving signature key "nope" not found'),
    ("classify log", "Unsupported log_type for warmup: classify_log"),
    ("not a prediction log", "Failed to parse warmup record"),
])
def test_a_bad_warmup_record_fails_the_load_naming_why(tmp_path, kind, message):
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name="cars", signature_name="nope"))
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([photos(1)[0]], dtype=tf.string))
    record = {
        "unknown signature": prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString(),
        "classify log": prediction_log_pb2.PredictionLog(
            classify_log=prediction_log_pb2.ClassifyLog(request=classification_pb2.ClassificationRequest()))
        .SerializeToString(),
        "not a prediction log": b"\xff\xff not a protobuf",
    }[kind]
    repository, _ = warmup_repository(tmp_path, [record])
    with pytest.raises(LoadError, match=message):
        repository.load_all()
    status = repository.version_states("cars")[1]
    assert status.state == get_model_status_pb2.ModelVersionStatus.END and message in status.error


def test_the_shipped_models_carry_warmup_records_for_every_signature():
    # the router's discovery calls every signature; without these its first calls would pay the graph set-up
    for version in sorted((REPO / "serving_models").glob("*/[0-9]*")):
        path = version / WARMUP_FILE
        assert path.is_file(), version
        logs = [prediction_log_pb2.PredictionLog.FromString(r)
                for r in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()]
        signatures = {log.predict_log.request.model_spec.signature_name for log in logs}
        served = set(read_meta_graph(version, ["serve"]).signature_def) - {"__saved_model_init_op"}
        assert signatures == served, version
