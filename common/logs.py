"""Structured (JSON lines) logging and the request id carried through a call."""
from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time
import uuid

# The request id of the RPC being served; downstream calls forward it.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
REQUEST_ID_HEADER = "x-request-id"


def new_request_id() -> str:
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy for a log shipper in a mesh to parse."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "event": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO", capture_native: bool = True) -> None:
    """Send every log record to stderr as JSON lines.

    With `capture_native`, text that C libraries print straight to file
    descriptor 2 (libjpeg's "Corrupt JPEG data" warnings, TensorFlow's C++
    logs) is turned into JSON lines too, instead of being interleaved with them.
    """
    stream = _capture_native_stderr() if capture_native else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}


def _capture_native_stderr():
    """Point fd 2 at a pipe read by a thread that logs each line; returns a stream on the real stderr."""
    sys.stderr.flush()
    real_stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace")  # Python's own writes too
    native = logging.getLogger("carrecog.native")

    def pump() -> None:
        with os.fdopen(read_end, "r", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.strip():
                    # absl's prefix ("I0000 ...", "W0000 ...") says the level; anything else is a warning
                    level = _ABSL_LEVELS.get(line[0], logging.WARNING) if line[1:5].isdigit() else logging.WARNING
                    native.log(level, "native stderr", extra={"fields": {"text": line.strip()[:2000]}})

    threading.Thread(target=pump, name="native-stderr", daemon=True).start()
    return real_stderr


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO,
              exc_info: BaseException | None = None, **fields: object) -> None:
    """Log `event` with structured fields (and a traceback when `exc_info` is given)."""
    logger.log(level, event, exc_info=exc_info, extra={"fields": fields})
