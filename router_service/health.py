"""The router's health: SERVING while it can answer, which a busy model server does not change.

The router follows its model server (a down logo service only degrades answers
and says so in each). What counts as evidence, at each check:

- the model server says the global model is AVAILABLE (GetModelStatus): SERVING;
- it refused the status call as busy (RESOURCE_EXHAUSTED): it answered, so it is
  alive: SERVING (the stand-in never refuses it, model_server.servicer, but a
  model server in front of or instead of it may);
- the status call failed otherwise (too slow, say) but a Predict succeeded since
  the previous check: SERVING;
- otherwise NOT_SERVING: the model server cannot be reached (UNAVAILABLE: killed,
  restarting, draining after SIGTERM), the global model has no AVAILABLE version
  (NOT_FOUND, or loading, or failed), or it stopped answering (a hung model server
  is NOT_SERVING at the second check after it stopped).

Checks run every `interval_s` while SERVING (ROUTER_HEALTH_INTERVAL_S, 5 s) and every
RECOVERY_POLL_S while not, so a restart is noticed within a fraction of a second.
The router's own SIGTERM turns it NOT_SERVING for good (common.server: the health
servicer's graceful shutdown ignores later changes).
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc

from common.logs import log_event
from common.server import GrpcServer
from router_service.catalog import ModelCatalog
from router_service.localizer import Localizer

logger = logging.getLogger("carrecog.router")
RECOVERY_POLL_S = 0.25
STATUS_TIMEOUT_S = 2.0
# The model server answered, and said it is too busy: alive.
BUSY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})
# It cannot be reached, or does not serve the global model: down, whatever answered before.
DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND})


def can_answer(status: bool | grpc.StatusCode, answered_lately: bool) -> bool:
    """Whether the router can answer: `status` is the status call's answer (is the global model AVAILABLE)
    or the code it failed with; `answered_lately`: a Predict succeeded since the previous check."""
    if isinstance(status, bool):
        return status
    if status in BUSY_CODES:
        return True
    if status in DOWN_CODES:
        return False
    return answered_lately


async def watch_downstreams(server: GrpcServer, catalog: ModelCatalog, interval_s: float,
                            localizer: Localizer | None = None) -> None:
    """Set the router's health from the evidence above, for as long as the router runs.

    After a model-server outage the router is SERVING again as soon as the
    global model's status is AVAILABLE (it kept the model's metadata; a new
    version is picked up on the next Predict); models never discovered are
    discovered all at once, in the background once the global model is known.
    The localiser never changes the health (without it photos are classified
    whole); it is probed in the background until it has answered once, so that
    ListModels can say which version is served.
    """
    serving = False
    catching_up: asyncio.Task | None = None
    probing: asyncio.Task | None = None
    previous_check = time.monotonic()
    while True:
        started = time.monotonic()
        try:
            status: bool | grpc.StatusCode = await catalog.client.is_available(catalog.global_name,
                                                                              timeout=STATUS_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            status = exc.code()
        ok = can_answer(status, catalog.answered_since(previous_check))
        previous_check = started
        if status is not True and serving:
            log_event(logger, "model server check failed", logging.WARNING,
                      code=status.name if isinstance(status, grpc.StatusCode) else "NOT_AVAILABLE",
                      still_serving=ok)
        if ok and catalog.global_model.meta is None:
            ok = await catalog.refresh(timeout=30.0)  # nothing to answer with until the global model is known
        elif status is True and not all(m.available for m in catalog.models.values()) and (
                catching_up is None or catching_up.done()):
            # brand models catch up while the router already serves
            catching_up = asyncio.create_task(catalog.refresh(timeout=30.0, only_unavailable=True))
        if ok and localizer is not None and not localizer.version and (probing is None or probing.done()):
            probing = asyncio.create_task(localizer.check(timeout=30.0))
        if ok != serving:
            serving = ok
            await server.set_serving(ok)
            log_event(logger, "health", status="SERVING" if ok else "NOT_SERVING")
        await asyncio.sleep(interval_s if serving else RECOVERY_POLL_S)
