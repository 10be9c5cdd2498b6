"""A circuit breaker for a downstream that may hang: stop asking it for a while after it fails.

closed     every call goes through; `failure_threshold` failures in a row open it.
open       no call goes through (the caller answers without the downstream at once)
           until `reset_after_s` has passed; then
half-open  exactly one call (the probe) goes through; its success closes the
           breaker, its failure opens it again for another `reset_after_s`.

Single-threaded by design: the router's event loop is its only user.
"""
from __future__ import annotations

import time
from typing import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int = 3, reset_after_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self.clock = clock
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probe_in_flight = False

    def allow(self) -> bool:
        """Whether this call may go to the downstream; when True, report its outcome."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() - self.opened_at >= self.reset_after_s:
            self.state = HALF_OPEN
        if self.state == HALF_OPEN and not self.probe_in_flight:
            self.probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self.state, self.failures, self.probe_in_flight = CLOSED, 0, False

    def record_failure(self) -> None:
        self.failures += 1
        if self.state == HALF_OPEN or self.failures >= self.failure_threshold:
            self.state, self.opened_at, self.probe_in_flight = OPEN, self.clock(), False

    def record_ignored(self) -> None:
        """The call ended in a way that says nothing about the downstream (e.g. a bad image)."""
        self.probe_in_flight = False

    def seconds_until_probe(self) -> float:
        return max(0.0, self.reset_after_s - (self.clock() - self.opened_at)) if self.state == OPEN else 0.0
