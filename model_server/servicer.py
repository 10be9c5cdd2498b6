"""gRPC servicers: tensorflow.serving.PredictionService and ModelService.

Thin async wrappers: each call runs its blocking function (model_server.predict)
in a thread pool so TensorFlow never blocks the event loop, and every exception
becomes a gRPC status in one place (`_serve`), with TF Serving's codes.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Any, Callable

import grpc
from tensorflow_serving.apis import (model_service_pb2, model_service_pb2_grpc, prediction_service_pb2,
                                     prediction_service_pb2_grpc)

from model_server import predict
from model_server.batch_scheduler import BatchScheduler
from model_server.errors import Unimplemented, status_of
from model_server.repository import ModelRepository

logger = logging.getLogger("carrecog.model_server")

# The *_pb2_grpc modules of tensorflow-serving-api do not import the service
# descriptors; importing *_pb2 registers them, which server reflection needs.
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


async def _serve(context: grpc.aio.ServicerContext, executor: Executor | None,
                 function: Callable[..., Any], *args: Any) -> Any:
    """Run `function(*args)` off the loop; map any failure to the status TF Serving would give."""
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, function, *args)
    except Exception as exc:
        code, message = status_of(exc)
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            logger.error("call failed", exc_info=exc)  # a bug here, not a bad request: keep the traceback
        await context.abort(code, message)


def _not_implemented(method: str) -> Unimplemented:
    return Unimplemented(f"{method} is not implemented by this TensorFlow Serving stand-in "
                         "(model_server serves Predict, GetModelMetadata and GetModelStatus)")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, repository: ModelRepository, executor: Executor | None = None,
                 batcher: BatchScheduler | None = None) -> None:
        self._repository = repository
        self._executor = executor
        self._batcher = batcher

    async def Predict(self, request, context):
        return await _serve(context, self._executor, predict.predict, self._repository, request, self._batcher)

    async def GetModelMetadata(self, request, context):
        return await _serve(context, self._executor, predict.get_model_metadata, self._repository, request)

    async def Classify(self, request, context):
        await context.abort(*status_of(_not_implemented("Classify")))

    async def Regress(self, request, context):
        await context.abort(*status_of(_not_implemented("Regress")))

    async def MultiInference(self, request, context):
        await context.abort(*status_of(_not_implemented("MultiInference")))


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, repository: ModelRepository, executor: Executor | None = None) -> None:
        self._repository = repository
        self._executor = executor

    async def GetModelStatus(self, request, context):
        return await _serve(context, self._executor, predict.get_model_status, self._repository, request)

    async def HandleReloadConfigRequest(self, request, context):
        await context.abort(*status_of(_not_implemented("HandleReloadConfigRequest")))


def add_servicers(server: grpc.aio.Server, repository: ModelRepository, executor: Executor | None,
                  batcher: BatchScheduler | None = None) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(repository, executor, batcher), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(repository, executor), server)
