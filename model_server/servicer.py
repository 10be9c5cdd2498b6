"""gRPC servicers: tensorflow.serving.PredictionService and ModelService.

Thin async wrappers: each call that touches TensorFlow runs its blocking function
(model_server.predict) in a thread pool so TensorFlow never blocks the event loop.
GetModelStatus only reads the load states, so it answers on the loop: it never
queues behind inference for a thread, and it is outside the concurrency limit
(UNLIMITED_METHODS), so a busy model server is not taken for a dead one.
Exceptions become gRPC statuses in one place for all services
(common.interceptors with common.errors), with TF Serving's codes and messages.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any, Callable

import grpc
from tensorflow_serving.apis import (model_service_pb2, model_service_pb2_grpc, prediction_service_pb2,
                                     prediction_service_pb2_grpc)

from model_server import predict
from model_server.batch_scheduler import BatchScheduler
from model_server.errors import Unimplemented
from model_server.repository import ModelRepository


# The *_pb2_grpc modules of tensorflow-serving-api do not import the service
# descriptors; importing *_pb2 registers them, which server reflection needs.
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
# Liveness calls that must answer however many Predicts are in flight (common.server.GrpcServer).
UNLIMITED_METHODS = (f"/{MODEL_SERVICE}/GetModelStatus",)


async def _serve(context: grpc.aio.ServicerContext, executor: Executor | None,
                 function: Callable[..., Any], *args: Any) -> Any:
    """Run `function(*args)` off the loop; a failure propagates to the shared error mapping."""
    return await asyncio.get_running_loop().run_in_executor(executor, function, *args)


def _not_implemented(method: str) -> Unimplemented:
    return Unimplemented(f"{method} is not implemented by this TensorFlow Serving stand-in "
                         "(model_server serves Predict, GetModelMetadata and GetModelStatus)")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, repository: ModelRepository, executor: Executor | None = None,
                 batcher: BatchScheduler | None = None, max_image_pixels: int = 0) -> None:
        self._repository = repository
        self._executor = executor
        self._batcher = batcher
        self._max_image_pixels = max_image_pixels

    async def Predict(self, request, context):
        return await _serve(context, self._executor, predict.predict, self._repository, request, self._batcher,
                            self._max_image_pixels)

    async def GetModelMetadata(self, request, context):
        return await _serve(context, self._executor, predict.get_model_metadata, self._repository, request)

    async def Classify(self, request, context):
        raise _not_implemented("Classify")

    async def Regress(self, request, context):
        raise _not_implemented("Regress")

    async def MultiInference(self, request, context):
        raise _not_implemented("MultiInference")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: ModelRepository) -> None:
        self._repository = repository

    async def GetModelStatus(self, request, context):
        return predict.get_model_status(self._repository, request)  # a dict lookup: no thread needed

    async def HandleReloadConfigRequest(self, request, context):
        raise _not_implemented("HandleReloadConfigRequest")


def add_servicers(server: grpc.aio.Server, repository: ModelRepository, executor: Executor | None,
                  batcher: BatchScheduler | None = None, max_image_pixels: int = 0) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(repository, executor, batcher, max_image_pixels), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(repository), server)
