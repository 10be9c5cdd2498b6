"""Server interceptors: request id propagation and one access-log line per RPC."""
from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from common.logs import REQUEST_ID, REQUEST_ID_HEADER, log_event, new_request_id

logger = logging.getLogger("carrecog.access")


def _request_id_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return new_request_id()


class RequestContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets REQUEST_ID for the handler, echoes it to the client, logs the outcome.

    The id comes from the caller's `x-request-id` metadata (a mesh sidecar sets
    it) or is generated, so one id follows a photo through every service.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        request_id = _request_id_from(details.invocation_metadata)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # unary-stream / stream-unary: not used by carrecog


def _begin(context: grpc.aio.ServicerContext, request_id: str) -> float:
    REQUEST_ID.set(request_id)
    try:
        context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
    except Exception:  # pragma: no cover - context already finished
        pass
    return time.perf_counter()


def _finish(method: str, started: float, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
    code = context.code() if hasattr(context, "code") else None
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        code = grpc.StatusCode.UNKNOWN
    code_name = code.name if isinstance(code, grpc.StatusCode) else "OK"
    level = logging.WARNING if code_name not in ("OK", "INVALID_ARGUMENT", "NOT_FOUND") else logging.INFO
    log_event(logger, "rpc", level, method=method, code=code_name,
              ms=round((time.perf_counter() - started) * 1000, 2))


def _wrap_unary(behavior: Callable, method: str, request_id: str) -> Callable:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = _begin(context, request_id)
        error = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _finish(method, started, context, error)

    return wrapped


def _wrap_stream(behavior: Callable, method: str, request_id: str) -> Callable:
    async def wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        started = _begin(context, request_id)
        error = None
        try:
            async for response in behavior(request_iterator, context):
                yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            _finish(method, started, context, error)

    return wrapped
