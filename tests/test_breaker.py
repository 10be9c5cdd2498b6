"""The logo circuit breaker's states, on a fake clock (the real-service test is in test_hardening.py)."""
from __future__ import annotations

from router_service.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_the_threshold_then_lets_one_probe_through():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, reset_after_s=5.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow() and breaker.seconds_until_probe() == 5.0
    clock.now = 5.0
    assert breaker.allow() and breaker.state == HALF_OPEN  # the probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()
    assert breaker.state == OPEN and not breaker.allow()
    clock.now = 10.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == CLOSED and breaker.allow() and breaker.failures == 0


def test_a_probe_that_ends_without_a_verdict_frees_the_next_probe():
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=1, reset_after_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now = 1.0
    assert breaker.allow()  # the probe goes out...
    breaker.record_ignored()  # ...and is cancelled by its caller, or the image was bad
    assert breaker.allow()  # the next call may probe
