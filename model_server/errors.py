"""Typed serving errors and the one mapping from an exception to a gRPC status.

The messages are TF Serving's own (copied from its C++ sources, cited where
they are raised), so a client that matches on them behaves the same against
this server and against the real `tensorflow/serving` container.
"""
from __future__ import annotations

import re

import grpc


class ServingError(Exception):
    """An error with the gRPC status TF Serving would answer with."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServingError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServingError):
    code = grpc.StatusCode.UNIMPLEMENTED


# TensorFlow's error codes are gRPC's codes (tensorflow/core/protobuf/error_codes.proto).
_CODE_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

# Eager TF wraps a kernel's message: "Graph execution error:\n\nDetected at node X
# defined at ...:\n<stack traces unavailable>\n<message>\n\t [[{{node X}}]] [Op:...]".
# TF Serving (Session::Run) reports only "<message>\n\t [[{{node X}}]]".
_EAGER_PREFIX = re.compile(r"\A.*?<stack traces unavailable>\n", re.DOTALL)
_EAGER_OP_SUFFIX = re.compile(r"\s*\[Op:[^\]]*\]\s*\Z")


def tensorflow_message(message: str) -> str:
    """A TF runtime error message as TF Serving would show it."""
    message = _EAGER_PREFIX.sub("", message)
    return _EAGER_OP_SUFFIX.sub("", message).strip()


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status for an exception raised while serving a call."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    error_code = getattr(exc, "error_code", None)  # tf.errors.OpError, without importing TF here
    if isinstance(error_code, int) and hasattr(exc, "op"):
        code = _CODE_BY_VALUE.get(error_code, grpc.StatusCode.UNKNOWN)
        return code, tensorflow_message(getattr(exc, "message", str(exc)))
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
