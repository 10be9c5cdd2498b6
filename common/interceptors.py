"""The server interceptor every carrecog service runs: what happens around each RPC.

- the request id: from the caller's `x-request-id` metadata (a mesh sidecar
  sets it) or generated, set for the handler and echoed in the trailers;
- the concurrency limit: calls beyond it get RESOURCE_EXHAUSTED at once and
  are logged, with a retry hint (the `grpc-retry-pushback-ms` trailer). Health checks
  and reflection are exempt, so a busy service still answers its orchestrator and
  is not restarted at its busiest; so are the methods a service names as `unlimited` (the model server's
  GetModelStatus, which the router's health follows), though they are logged;
- errors: a typed error (common.errors) becomes its status, with its retry hint if it has
  one (the same trailer); anything else is
  INTERNAL with the request id, its traceback goes to the log, not the client;
- request bytes that do not parse (a truncated message, bad UTF-8 in a string
  field) are INVALID_ARGUMENT with a plain message and a warning in the log,
  not grpc's UNKNOWN naming the parser's exception class with a traceback;
- one access-log line per call with the status the client saw (a cancelled
  or expired call is logged as such, not as UNKNOWN);
- an optional observer (common.metrics.RpcMetrics) told of each call's start,
  its answers and that same final status, refused calls included.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

import grpc

from common.errors import INTERNAL_MESSAGE, RETRY_PUSHBACK_HEADER, InvalidArgument, status_of
from common.logs import REQUEST_ID, REQUEST_ID_HEADER, log_event, new_request_id

logger = logging.getLogger("carrecog.access")

# Never limited and never access-logged: an orchestrator polls them all the time.
UNLIMITED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# The retry hint on a refusal by the concurrency limit: a slot frees within about one call.
LIMIT_PUSHBACK_MS = 100
# Outcomes that are the caller's doing or normal answers, not the service's trouble.
QUIET_CODES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "DEADLINE_EXCEEDED"}


class RpcObserver(Protocol):
    """Told about every call ServiceInterceptor wraps (common.metrics.RpcMetrics)."""

    def started(self, method: str, grpc_type: str) -> None: ...

    def response(self, method: str, message: Any) -> None: ...

    def handled(self, method: str, grpc_type: str, code: str, seconds: float) -> None: ...


class _Unparsable:
    """Stands in for a request whose bytes did not parse; the call refuses it before the servicer runs.

    A deserializer that raised would make grpc answer UNKNOWN itself, outside any interceptor."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def refusal(self, method: str) -> InvalidArgument:
        log_event(logger, "request could not be parsed", logging.WARNING, method=method, error=str(self.error))
        reason = " ".join(str(self.error).split())[:200] or "not a protobuf message"
        return InvalidArgument(f"the request could not be parsed: {reason}")


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The handler's request deserializer, answering _Unparsable instead of raising."""
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, UnicodeDecodeError, ... whatever the parser raises
            return _Unparsable(exc)

    return deserialize


def _request_id_from(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_HEADER and value:
            return str(value)[:128]
    return new_request_id()


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Request id, concurrency limit, error mapping and access log for every non-health RPC."""

    def __init__(self, max_concurrent_rpcs: int, observer: RpcObserver | None = None,
                 unlimited: Sequence[str] = ()) -> None:
        self.limit = max_concurrent_rpcs
        self.in_flight = 0
        self.observer = observer
        self.unlimited = frozenset(unlimited)  # full method names ("/pkg.Service/Method") the limit skips

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNLIMITED_PREFIXES):
            return handler
        request_id = _request_id_from(details.invocation_metadata)
        if handler.unary_unary:
            call = _Call(self, details.method, request_id, "unary", details.method not in self.unlimited)
            return grpc.unary_unary_rpc_method_handler(
                call.wrap_unary(handler.unary_unary),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            call = _Call(self, details.method, request_id, "bidi_stream", details.method not in self.unlimited)
            return grpc.stream_stream_rpc_method_handler(
                call.wrap_stream(handler.stream_stream),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # unary-stream / stream-unary: not used by carrecog's own services


class _Call:
    """One RPC's bookkeeping: admitted or refused, its outcome, its log line."""

    def __init__(self, owner: ServiceInterceptor, method: str, request_id: str, grpc_type: str,
                 limited: bool = True) -> None:
        self.owner = owner
        self.limited = limited
        self.observer = owner.observer
        self.method = method
        self.request_id = request_id
        self.grpc_type = grpc_type
        self.started = 0.0
        self.code = "OK"

    async def _begin(self, context: grpc.aio.ServicerContext) -> None:
        REQUEST_ID.set(self.request_id)
        self.started = time.perf_counter()
        if self.observer is not None:
            self.observer.started(self.method, self.grpc_type)
        context.set_trailing_metadata(((REQUEST_ID_HEADER, self.request_id),))
        if not self.limited:
            return
        if self.owner.in_flight >= self.owner.limit:
            self.code = "RESOURCE_EXHAUSTED"
            self._finish()
            context.set_trailing_metadata(((REQUEST_ID_HEADER, self.request_id),
                                           (RETRY_PUSHBACK_HEADER, str(LIMIT_PUSHBACK_MS))))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the service is at its limit of {self.owner.limit} concurrent calls; "
                                "retry with backoff")
        self.owner.in_flight += 1

    async def _fail(self, exc: BaseException, context: grpc.aio.ServicerContext) -> None:
        """Turn an exception that escaped the handler into the status the client sees."""
        if isinstance(exc, grpc.aio.AbortError):
            code = context.code()
            self.code = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
            raise exc
        if isinstance(exc, asyncio.CancelledError):
            remaining = context.time_remaining()
            self.code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            raise exc
        code, message = status_of(exc)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            context.set_trailing_metadata(((REQUEST_ID_HEADER, self.request_id),
                                           (RETRY_PUSHBACK_HEADER, str(round(retry_after_s * 1000)))))
        if code == grpc.StatusCode.INTERNAL:
            log_event(logger, "unexpected error", logging.ERROR, method=self.method, exc_info=exc)
            message = INTERNAL_MESSAGE.format(request_id=self.request_id)
        self.code = code.name
        await context.abort(code, message)

    def _end(self, context: grpc.aio.ServicerContext) -> None:
        if self.limited:
            self.owner.in_flight -= 1
        if self.code == "OK":
            code = context.code()
            if isinstance(code, grpc.StatusCode):
                self.code = code.name
        self._finish()

    def _finish(self) -> None:
        """The call's outcome: one access-log line, and the observer told."""
        seconds = time.perf_counter() - self.started
        level = logging.INFO if self.code in QUIET_CODES else logging.WARNING
        log_event(logger, "rpc", level, method=self.method, code=self.code, ms=round(seconds * 1000, 2))
        if self.observer is not None:
            self.observer.handled(self.method, self.grpc_type, self.code, seconds)

    def wrap_unary(self, behavior: Callable) -> Callable:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._begin(context)
            try:
                if isinstance(request, _Unparsable):
                    raise request.refusal(self.method)
                response = await behavior(request, context)
                if self.observer is not None:
                    self.observer.response(self.method, response)
                return response
            except BaseException as exc:
                await self._fail(exc, context)
            finally:
                self._end(context)

        return wrapped

    async def _parsed(self, requests: Any) -> Any:
        """The stream's requests; one that did not parse ends the call with INVALID_ARGUMENT."""
        async for request in requests:
            if isinstance(request, _Unparsable):
                raise request.refusal(self.method)
            yield request

    def wrap_stream(self, behavior: Callable) -> Callable:
        async def wrapped(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            await self._begin(context)
            try:
                async for response in behavior(self._parsed(request_iterator), context):
                    if self.observer is not None:
                        self.observer.response(self.method, response)
                    yield response
            except BaseException as exc:
                await self._fail(exc, context)
            finally:
                self._end(context)

        return wrapped
