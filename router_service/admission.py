"""Admission: the router takes on only the work it can finish within each caller's deadline.

A first-in, first-out gate lets `max_active` recognitions work downstream at once: the model
server's throughput is flat beyond that (docs/operations.md, "Admission"), so more at once would
only make every call slower. The others wait in arrival order, and a call is refused with
RESOURCE_EXHAUSTED and a retry hint (the `grpc-retry-pushback-ms` trailer of gRPC's retry
design, also in the message) rather than accepted to time out:

- on arrival, when the wait ahead of it plus a slow service time (the p90 of recent ones)
  would end after its deadline: the refusal costs well under a millisecond of the router;
- while waiting, as soon as what is left of its deadline falls below that service time.

An admitted call that still runs out of its deadline while others queue behind it is answered
RESOURCE_EXHAUSTED too. The router works to its caller's deadline less `DEADLINE_MARGIN_S`, so a
proxy in front (Envoy) sees the router's own answer, not its own timeout, and never ejects a busy
router as a failing one. A call without a deadline waits; the server's concurrency limit bounds
the queue.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from contextlib import asynccontextmanager
from typing import AsyncIterator

import grpc

from common.errors import ResourceExhausted

# The router answers this long before a caller's deadline, so the answer reaches the caller
# (through a proxy) before the caller or the proxy gives up on its own.
DEADLINE_MARGIN_S = 0.05
# Service times remembered for the estimates: enough for a stable p90, recent enough to follow load.
HISTORY = 64
# A call that failed this close to its deadline ran out of time.
RAN_OUT_S = 0.01
MIN_PUSHBACK_S = 0.05
MAX_PUSHBACK_S = 5.0


class Overloaded(ResourceExhausted):
    """Refused for load: RESOURCE_EXHAUSTED with the time after which a retry may succeed."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        retry_after_s = min(MAX_PUSHBACK_S, max(MIN_PUSHBACK_S, retry_after_s))
        super().__init__(f"{message}; retry after {retry_after_s * 1000:.0f} ms", retry_after_s=retry_after_s)


class AdmissionGate:
    """At most `max_active` calls inside at once, the rest queued first-in first-out, each refused
    as soon as it is clear it cannot be answered within its deadline."""

    def __init__(self, max_active: int) -> None:
        if max_active < 1:
            raise ValueError(f"max_active must be at least 1, got {max_active}")
        self.max_active = max_active
        self.active = 0
        self.waiting: deque[asyncio.Future] = deque()
        self.service_s: deque[float] = deque(maxlen=HISTORY)
        self.refused = 0

    # --- estimates -------------------------------------------------------------------------

    def _quantile(self, q: float) -> float:
        if not self.service_s:
            return 0.0  # nothing measured yet: admit, and learn
        ordered = sorted(self.service_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def slow_service_s(self) -> float:
        """How long an admitted call may take: the p90 of recent service times."""
        return self._quantile(0.9)

    def expected_wait_s(self, ahead: int) -> float:
        """The wait before a slot frees for a call with `ahead` calls queued before it: every
        `max_active` calls ahead take about one typical service time."""
        if self.active < self.max_active and not self.waiting:
            return 0.0
        return (ahead + 1) / self.max_active * self._quantile(0.5)

    @property
    def saturated(self) -> bool:
        return self.active >= self.max_active or bool(self.waiting)

    # --- the gate ----------------------------------------------------------------------------

    def _refuse(self, reason: str, retry_after_s: float) -> Overloaded:
        self.refused += 1
        return Overloaded(f"the router is at capacity: {reason}", retry_after_s)

    @asynccontextmanager
    async def slot(self, deadline: float | None) -> AsyncIterator[None]:
        """Hold one of the active places while the body runs. `deadline`: the time.perf_counter() value by
        which the router must have answered (the caller's deadline less DEADLINE_MARGIN_S)."""
        wait = self.expected_wait_s(len(self.waiting))
        if deadline is not None and self.saturated:
            left = deadline - time.perf_counter()
            if wait + self.slow_service_s() > left:
                raise self._refuse(f"{len(self.waiting)} calls are queued ahead (about {wait * 1000:.0f} ms) and "
                                   f"one takes up to {self.slow_service_s() * 1000:.0f} ms, more than the "
                                   f"{max(left, 0) * 1000:.0f} ms left of the deadline", wait)
        if self.saturated:
            await self._wait_turn(deadline)
        else:
            self.active += 1
        started = time.perf_counter()
        try:
            yield
        except Exception as exc:
            ran_out = deadline is not None and time.perf_counter() >= deadline - RAN_OUT_S
            if ran_out and getattr(exc, "code", None) == grpc.StatusCode.DEADLINE_EXCEEDED and self.waiting:
                raise self._refuse("the call could not be finished within its deadline",
                                   self.expected_wait_s(len(self.waiting))) from exc
            raise
        finally:
            self.service_s.append(time.perf_counter() - started)
            self._release()

    async def _wait_turn(self, deadline: float | None) -> None:
        """Queue until a finishing call hands over its place (the place is then already ours)."""
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        timeout = None if deadline is None else deadline - time.perf_counter() - self.slow_service_s()
        try:
            await asyncio.wait_for(asyncio.shield(turn), timeout)
        except asyncio.TimeoutError:
            if turn.done():  # handed over just as the wait ended: give it on
                self._release()
            else:
                self.waiting.remove(turn)
            raise self._refuse("the queue did not move fast enough to answer within the deadline",
                               self.expected_wait_s(len(self.waiting))) from None
        except BaseException:  # cancelled by the caller
            if turn.done():
                self._release()
            elif turn in self.waiting:
                self.waiting.remove(turn)
            raise

    def _release(self) -> None:
        """A call left: its place goes to the first waiter, else back to the pool."""
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.active -= 1
