"""Entry-point helper: parse flags, set up JSON logs, run the service's coroutine."""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Awaitable, Callable

from common import tracing
from common.logs import configure_logging, log_event


def run_service(name: str, main: Callable[[], Awaitable[None]], log_level: str = "INFO") -> None:
    """Run `main` until it returns; a startup failure exits 1 with a clear log line."""
    configure_logging(name, log_level)
    try:
        tracing.init(name)  # on when OTEL_EXPORTER_OTLP_ENDPOINT is set
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # fail fast and say why, e.g. a broken plugin manifest
        log_event(logging.getLogger(f"carrecog.{name}"), "startup failed", logging.ERROR, exc_info=exc,
                  error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
