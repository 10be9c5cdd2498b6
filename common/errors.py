"""Typed service errors and the one mapping from an exception to a gRPC status.

Every carrecog service raises these from plain code and lets the shared
interceptor (common.interceptors) turn them into a status, so an RPC handler
stays a few lines long and no service invents its own mapping. Anything else
that escapes a handler is a bug: the client gets INTERNAL with the request id
to quote, and the traceback goes to the log, never to the client.
"""
from __future__ import annotations

import re

import grpc


# gRPC's retry design (proposal A6): a server's hint, in milliseconds, of when a retry may succeed.
# A client with a retry policy waits this long; the interceptor sends it for errors that carry one.
RETRY_PUSHBACK_HEADER = "grpc-retry-pushback-ms"


class ServiceError(Exception):
    """An error with the gRPC status the client should see; `message` is safe to show to a client.

    `retry_after_s`: set when a retry after that long may succeed (load, a restart); sent to the
    client as the RETRY_PUSHBACK_HEADER trailer."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        if code is not None:
            self.code = code


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# TensorFlow's error codes are gRPC's codes (tensorflow/core/protobuf/error_codes.proto).
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

# Eager TF wraps a kernel's message: "Graph execution error:\n\nDetected at node X
# defined at ...:\n<stack traces unavailable>\n<message>\n\t [[{{node X}}]] [Op:...]".
# TF Serving (Session::Run) reports only "<message>\n\t [[{{node X}}]]".
_EAGER_PREFIX = re.compile(r"\A.*?<stack traces unavailable>\n", re.DOTALL)
_EAGER_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\]\s*\Z")
# Graph internals a client cannot act on: "\t [[{{node decode/DecodeJpeg}}]]",
# "[[{{function_node __inference_serve_1}}{{node Assert/Assert}}]]" and the like.
_NODE_NAMES = re.compile(r"\s*\[\[\{\{(?:function_)?node [^\]]*\]\]")
# Peer addresses that grpc puts into connection errors ("ipv4:127.0.0.1:8500", "unix:/x").
_PEERS = re.compile(r"\b(?:ipv4|ipv6|unix|unix-abstract|dns):[^\s,;)\]}'\"]+")

INTERNAL_MESSAGE = "internal error while serving the call; the service logged it under request id {request_id}"


def tensorflow_message(message: str) -> str:
    """A TF runtime error message as TF Serving would show it."""
    message = _EAGER_PREFIX.sub("", message)
    return _EAGER_OP_SUFFIX.sub("", message).strip()


def client_message(details: str | None, limit: int = 300) -> str:
    """A downstream's error text made fit for our own clients: no node names, peer addresses or
    unbounded echo. The full text goes to the log instead."""
    text = _NODE_NAMES.sub("", details or "")
    text = _PEERS.sub("<downstream>", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised while serving a call.

    INTERNAL carries no details: the caller logs the traceback and tells the
    client the request id instead (see common.interceptors).
    """
    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    error_code = getattr(exc, "error_code", None)  # tf.errors.OpError, without importing TF here
    if isinstance(error_code, int) and hasattr(exc, "op"):
        code = _CODE_BY_VALUE.get(error_code, grpc.StatusCode.UNKNOWN)
        return code, tensorflow_message(getattr(exc, "message", str(exc)))
    return grpc.StatusCode.INTERNAL, ""
