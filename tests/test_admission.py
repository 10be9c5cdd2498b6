"""Admission (issue 24 §2): a router at capacity refuses early, with a retry hint, instead of timing out.

The gate's rules on their own (asyncio, no services), then the real router on the session's
model server, flooded by more callers than it can answer within their deadline.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import pytest

from carrecog.v1 import recognition_service_pb2 as pb
from common.errors import RETRY_PUSHBACK_HEADER
from router_service.admission import AdmissionGate, Overloaded
from tests import images
from tests.test_faults import stub_for


def run(coroutine):
    return asyncio.run(coroutine)


async def _hold(gate: AdmissionGate, seconds: float, deadline: float | None = None, log: list | None = None,
                name: str = "") -> str:
    async with gate.slot(deadline):
        if log is not None:
            log.append(name)
        await asyncio.sleep(seconds)
    return name


def test_calls_beyond_the_limit_queue_and_are_served_in_arrival_order():
    async def scenario():
        gate, order = AdmissionGate(max_active=2), []
        tasks = [asyncio.create_task(_hold(gate, 0.05, None, order, str(i))) for i in range(6)]
        await asyncio.sleep(0.01)
        assert (gate.active, len(gate.waiting)) == (2, 4)
        await asyncio.gather(*tasks)
        assert order == [str(i) for i in range(6)]
        assert (gate.active, len(gate.waiting), gate.refused) == (0, 0, 0)

    run(scenario())


def test_a_call_that_cannot_make_its_deadline_is_refused_on_arrival_with_a_hint():
    async def scenario():
        gate = AdmissionGate(max_active=1)
        for _ in range(5):  # the gate learns that one call takes about 0.1 s
            await _hold(gate, 0.1)
        busy = asyncio.create_task(_hold(gate, 0.3))
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await _hold(gate, 0.1, deadline=time.perf_counter() + 0.15)
        assert time.perf_counter() - started < 0.005  # refused at once, not after waiting
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0.05 <= refused.value.retry_after_s <= 0.2
        assert "retry after" in refused.value.message
        # One with time enough waits its turn and is served.
        assert await _hold(gate, 0.05, deadline=time.perf_counter() + 2.0, name="served") == "served"
        await busy
        assert (gate.active, len(gate.waiting), gate.refused) == (0, 0, 1)

    run(scenario())


def test_a_waiting_call_is_refused_when_the_rest_of_its_deadline_gets_too_short():
    async def scenario():
        gate = AdmissionGate(max_active=1)
        for _ in range(5):
            await _hold(gate, 0.05)
        stuck = asyncio.create_task(_hold(gate, 1.0))  # slower than the gate has seen: the queue stalls
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(Overloaded):
            await _hold(gate, 0.05, deadline=started + 0.4)
        waited = time.perf_counter() - started
        assert 0.3 <= waited <= 0.4  # when 0.4 s less one service time (about 0.05 s) had passed
        assert len(gate.waiting) == 0
        await stuck
        assert gate.active == 0

    run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_its_place_goes_on():
    async def scenario():
        gate = AdmissionGate(max_active=1)
        first = asyncio.create_task(_hold(gate, 0.1))
        await asyncio.sleep(0.01)
        cancelled = asyncio.create_task(_hold(gate, 0.1))
        last = asyncio.create_task(_hold(gate, 0.01, name="last"))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await first
        assert await last == "last"
        assert (gate.active, len(gate.waiting)) == (0, 0)

    run(scenario())


def test_running_out_of_deadline_while_saturated_is_a_refusal_not_a_timeout():
    from router_service.routing import RecognitionError

    async def failing_call(gate, deadline):
        async with gate.slot(deadline):
            await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
            raise RecognitionError(grpc.StatusCode.DEADLINE_EXCEEDED, "model did not answer within the deadline")

    async def scenario():
        gate = AdmissionGate(max_active=1)
        slow = asyncio.create_task(failing_call(gate, time.perf_counter() + 0.1))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(_hold(gate, 0.01))  # someone waits behind it
        with pytest.raises(Overloaded):
            await slow
        await queued
        # Alone, a slow downstream is what it is: DEADLINE_EXCEEDED.
        with pytest.raises(RecognitionError) as alone:
            await failing_call(gate, time.perf_counter() + 0.05)
        assert alone.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    run(scenario())


# --- the real router --------------------------------------------------------------------------

CALLERS = 48
DEADLINE_S = 1.5
LOAD_S = 8.0
WARM_CALLS = 8  # the gate estimates from the service times it has seen: a cold one admits everything


# Slow suite: in clean-clone CI runs, with the 48 callers' threads in the test process and the model server
# just started on 2 cores, 4 of 329 calls (and 33 of 698 with a cold gate) ended DEADLINE_EXCEEDED.
@pytest.mark.slow
@pytest.mark.integration
def test_a_flooded_router_answers_or_refuses_every_call_within_its_deadline(make_router):
    """48 callers with a 1.5 s deadline against a router that answers 4 at a time: the calls it cannot
    answer in time are refused at once with a retry hint, which the callers honour; none times out,
    and health stays SERVING."""
    router = make_router("", env={"ROUTER_MAX_ACTIVE": "4"})
    router.wait_healthy(timeout=120)
    outcomes: list[tuple[str, float, int | None]] = []  # code, seconds, pushback ms
    stopping = threading.Event()
    channel, stub = stub_for(router)
    request = pb.RecognizeRequest(image=images.photo("00001"))
    for _ in range(WARM_CALLS):
        stub.Recognize(request, timeout=30)

    def call() -> None:
        while not stopping.is_set():
            started = time.monotonic()
            try:
                stub.Recognize(request, timeout=DEADLINE_S)
                outcomes.append(("OK", time.monotonic() - started, None))
            except grpc.RpcError as exc:
                hint = dict(exc.trailing_metadata() or ()).get(RETRY_PUSHBACK_HEADER)
                outcomes.append((exc.code().name, time.monotonic() - started, int(hint) if hint else None))
                if hint:
                    time.sleep(int(hint) / 1000)  # a well-behaved client waits as told

    health = Counter()
    threads = [threading.Thread(target=call, daemon=True) for _ in range(CALLERS)]
    with channel:
        for thread in threads:
            thread.start()
        end = time.monotonic() + LOAD_S
        while time.monotonic() < end:
            health[router.health()] += 1
            time.sleep(0.5)
        stopping.set()
        for thread in threads:
            thread.join(30)
    codes = Counter(code for code, _, _ in outcomes)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] > 0 and codes["RESOURCE_EXHAUSTED"] > 0, codes
    assert max(seconds for _, seconds, _ in outcomes) < DEADLINE_S + 0.1
    refusals = sorted(seconds for code, seconds, _ in outcomes if code == "RESOURCE_EXHAUSTED")
    assert refusals[len(refusals) // 2] < 0.05, refusals  # most are refused on arrival, at once
    assert all(hint is not None and hint >= 50 for code, _, hint in outcomes if code == "RESOURCE_EXHAUSTED")
    assert set(health) == {"SERVING"}, health
