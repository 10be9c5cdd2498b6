"""The model server's errors: the shared typed errors of common.errors.

The messages raised with them are TF Serving's own (copied from its C++
sources, cited where they are raised), so a client that matches on them
behaves the same against this server and against the real
`tensorflow/serving` container. The mapping to a status is the shared one.
"""
from common.errors import (FailedPrecondition, InvalidArgument, NotFound, ServiceError, Unavailable,  # noqa: F401
                           Unimplemented, status_of, tensorflow_message)

ServingError = ServiceError  # the name the model server's modules and tests know

__all__ = ["FailedPrecondition", "InvalidArgument", "NotFound", "ServiceError", "ServingError", "Unavailable",
           "Unimplemented", "status_of", "tensorflow_message"]
