"""When the logo stage runs (ROUTER_LOGO_POLICY): `always`, concurrently with the global model, or
`uncertain`, only below the make confidence calibrated on val (router_service/logo_policy.json)."""
from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from carrecog.v1 import recognition_service_pb2 as pb
from router_service.settings import DEFAULT_LOGO_POLICY_FILE
from tests.test_faults import stub_for
from tests.test_stack import recognize

pytestmark = pytest.mark.integration
CALIBRATED = json.loads(DEFAULT_LOGO_POLICY_FILE.read_text())["uncertain_below"]


def test_always_runs_the_logo_stage_beside_the_model_and_never_waits_past_its_timeout(make_router, own_logo_service,
                                                                                       no_logo_photo):
    router = make_router(own_logo_service.address, env={"ROUTER_LOGO_POLICY": "always", "ROUTER_LOGO_TIMEOUT_MS": "800",
                                                        "ROUTER_LOGO_BREAKER_FAILURES": "100"})
    router.wait_healthy()
    channel, stub = stub_for(router)
    with channel:
        assert recognize(stub, no_logo_photo.path.read_bytes()).logo_consulted  # connected, warm
        own_logo_service.process.send_signal(signal.SIGSTOP)  # hung: the connection stays, no answer comes
        started = time.monotonic()
        reply = recognize(stub, no_logo_photo.path.read_bytes())
        elapsed = time.monotonic() - started
    assert reply.route == pb.ROUTE_FALLBACK_GLOBAL and reply.label
    assert reply.fallback_reason == pb.FALLBACK_REASON_LOGO_SERVICE_TIMEOUT
    ms = {t.stage: t.ms for t in reply.timings}
    predict = next(v for k, v in ms.items() if k.startswith("predict:"))
    assert ms["logo"] >= 790 and elapsed < 0.8 + 1.0
    framing = ms.get("localize", 0) + ms.get("crop", 0)  # runs before both stages, by design
    assert ms["total"] - framing < ms["logo"] + 0.5 * predict  # concurrent: not the sum of the two stages


def test_uncertain_skips_the_logo_stage_when_the_model_is_sure_and_says_why(make_router, logo_service, logo_hit):
    router = make_router(logo_service.address, env={"ROUTER_LOGO_POLICY": "uncertain"})  # calibrated threshold
    router.wait_healthy()
    assert f'"uncertain_below": {CALIBRATED}' in router.log_path.read_text()  # the calibration file, applied
    photo = logo_hit[0].path.read_bytes()
    channel, stub = stub_for(router)
    with channel:
        reply = recognize(stub, photo)
    if reply.make_confidence >= CALIBRATED:
        assert not reply.logo_consulted and reply.route == pb.ROUTE_GLOBAL_MODEL
        assert "logo stage skipped: the global model is sure of the make" in reply.route_detail
        assert "logo" not in {t.stage for t in reply.timings}
    else:
        assert reply.logo_consulted


@pytest.mark.parametrize("threshold, consulted", [("0", False), ("1.01", True)])
def test_uncertain_threshold_decides_whether_the_logo_is_asked(make_router, logo_service, logo_hit, threshold,
                                                               consulted):
    router = make_router(logo_service.address, env={"ROUTER_LOGO_POLICY": "uncertain",
                                                    "ROUTER_LOGO_UNCERTAIN_BELOW": threshold})
    router.wait_healthy()
    channel, stub = stub_for(router)
    with channel:
        reply = recognize(stub, logo_hit[0].path.read_bytes())
    assert reply.logo_consulted == consulted
    assert reply.route == (pb.ROUTE_BRAND_MODEL if consulted else pb.ROUTE_GLOBAL_MODEL), reply.route_detail


def test_logo_reach_counts_what_the_matcher_sees_on_the_models_errors():
    """builders.logo_reach: an error is fixable only when the matcher verifies the true brand; a
    corroborated gate fires only where the model gives the brand enough probability."""
    from builders.logo_reach import gate_row, reach

    makes = ["Chevrolet", "GMC"]

    def photo(make, truth, totals, candidates):  # totals as make_probabilities gives them: numpy rows
        return {"make": make, "truth": truth, "totals": np.array(totals),
                "candidates": [{"brand": b, "inliers": n, "makes": [b.upper() if b == "gmc" else "Chevrolet"],
                                "brand_probability": p} for b, n, p in candidates]}

    photos = [
        photo("GMC", "gmc", [0.7, 0.3], [("gmc", 5, 0.3)]),  # model wrong, logo sees the truth: fixable
        photo("GMC", "gmc", [0.9, 0.1], []),  # model wrong, no logo: not fixable
        photo("Chevrolet", "chevrolet", [0.95, 0.05], [("gmc", 4, 0.05)]),  # right, a weak wrong logo
        photo("Chevrolet", "chevrolet", [0.8, 0.2], [("chevrolet", 12, 0.8)]),
    ]
    r = reach(photos, makes)
    assert (r["model_make_errors"], r["errors_with_true_brand_verified"], r["errors_with_true_brand_best"]) == (2, 1, 1)
    assert r["true_brand_inliers_on_errors"] == [5]
    alone = gate_row(photos, 4, 0.0, makes)
    assert (alone["fired"], alone["right"], alone["always_policy_make_top1"]) == (3, 2, 0.5)
    corroborated = gate_row(photos, 4, 0.1, makes)  # the 4-inlier GMC logo has only 0.05: not fired
    assert (corroborated["fired"], corroborated["right"], corroborated["always_policy_make_top1"]) == (2, 2, 0.75)
    assert gate_row(photos, 10, 0.0, makes)["fired"] == 1
    assert gate_row(photos, 4, 0.0, makes, uncertain_below=0.85)["fired_under_uncertain_policy"] == 2  # 0.7, 0.8
    json.dumps(reach(photos, makes, uncertain_below=0.85))  # the report is written as JSON
