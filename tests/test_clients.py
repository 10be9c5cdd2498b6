"""The clients in other languages (clients/, built by `make clients`) against the real stack.

Each one must print the lines `python -m client` prints for the same photos:
same fields, same answer, same box and framing, same error codes and
messages, exit status 1 after a failed image; --box sends the caller's car box
(a malformed one is a usage error, exit status 2); over mTLS with
--ca/--cert/--key. And the stack that harness/stack.py starts (so `make run`)
serves gRPC reflection.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys

import grpc
import pytest

from harness.stack import ROOT, start_router
from tests.certs import make_certificates

pytestmark = pytest.mark.integration

COMMANDS = {
    "python": [sys.executable, "-m", "client"],
    "node": ["node", str(ROOT / "clients" / "node" / "recognize.js")],
    "go": [str(ROOT / "bin" / "carrecog-go")],
    "cpp": [str(ROOT / "bin" / "carrecog-cpp")],
}
OTHERS = ["node", "go", "cpp"]
# Fields that must agree exactly between the clients for the same photo (ms, confidences and the box aside).
SAME = ["image", "make", "model", "year", "label", "route", "route_detail", "cars_found", "framing", "verdict",
        "model_name", "model_version", "logo"]
BOX_KEYS = ["x_min", "y_min", "x_max", "y_max", "score"]


def assert_box(mine: dict, theirs: dict) -> None:
    """Box coordinates and score are floats, printed as confidences are: equal within rounding."""
    assert list(mine) == BOX_KEYS and list(theirs) == BOX_KEYS, (mine, theirs)
    assert [mine[k] for k in BOX_KEYS] == pytest.approx([theirs[k] for k in BOX_KEYS], abs=2e-4), (mine, theirs)


def run_client(name: str, address: str, *args: str, timeout: float = 180) -> tuple[int, list[str], str]:
    command = COMMANDS[name]
    if not (name in ("python", "node") or os.access(command[0], os.X_OK)):
        pytest.fail(f"{command[0]} is missing: run `make clients`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}  # no address or TLS from the env
    done = subprocess.run([*command, "--address", address, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout.splitlines(), done.stderr


@pytest.fixture(scope="module")
def inputs(logo_hit, no_logo_photo, tmp_path_factory):
    """A logo-gated photo, a plain one and a file of random bytes named like a JPEG."""
    bad = tmp_path_factory.mktemp("clients") / "random.jpg"
    bad.write_bytes(os.urandom(4096))
    return [str(logo_hit[0].path), str(no_logo_photo.path), str(bad)]


@pytest.fixture(scope="module")
def python_lines(router, inputs):
    code, lines, err = run_client("python", router.address, *inputs)
    assert code == 1 and len(lines) == 3, err
    return [json.loads(line) for line in lines]


def test_python_reference_lines(python_lines):
    hit, plain, bad = python_lines
    assert hit["route"] == "brand_model" and hit["logo"]["matched"]
    assert plain["route"] == "global_model"
    for answer in (hit, plain):
        assert list(answer["box"]) == BOX_KEYS
        box = answer["box"]
        assert 0 <= box["x_min"] < box["x_max"] <= 1 and 0 <= box["y_min"] < box["y_max"] <= 1, box
        assert answer["framing"] in ("cropped", "already_tight", "no_car_found", "whole_photo"), answer
        assert isinstance(answer["cars_found"], int) and answer["cars_found"] >= 0
        assert answer["verdict"] == "recognized", answer  # catalogue photos
        assert answer["verdict_score"] < answer["verdict_threshold"], answer
    assert bad["error"]["code"] == "INVALID_ARGUMENT" and bad["error"]["message"]


@pytest.mark.parametrize("name", OTHERS)
def test_client_prints_what_the_python_client_prints(name, router, inputs, python_lines):
    code, lines, err = run_client(name, router.address, *inputs)
    assert code == 1, err  # the bad image fails, after the others
    assert len(lines) == 3, (lines, err)
    got = [json.loads(line) for line in lines]
    for mine, theirs in zip(got[:2], python_lines[:2]):
        assert list(mine) == list(theirs)  # the same fields in the same order
        assert {k: mine[k] for k in SAME} == {k: theirs[k] for k in SAME}
        assert mine["confidence"] == pytest.approx(theirs["confidence"], abs=2e-4)
        assert mine["make_confidence"] == pytest.approx(theirs["make_confidence"], abs=2e-4)
        assert mine["verdict_score"] == pytest.approx(theirs["verdict_score"], abs=2e-4)
        assert mine["verdict_threshold"] == pytest.approx(theirs["verdict_threshold"], abs=2e-4)
        assert_box(mine["box"], theirs["box"])
        assert [p["label"] for p in mine["top_k"]] == [p["label"] for p in theirs["top_k"]]
        assert [p["confidence"] for p in mine["top_k"]] == pytest.approx(
            [p["confidence"] for p in theirs["top_k"]], abs=2e-4)
        assert set(mine["ms"]) == set(theirs["ms"])
    assert got[0]["route"] == "brand_model" and got[1]["route"] == "global_model"
    assert got[2] == python_lines[2]  # {"image", "error": {"code": "INVALID_ARGUMENT", "message": ...}}
    assert lines == [json.dumps(line) for line in got]  # written as python's json.dumps writes it


@pytest.mark.parametrize("name", OTHERS)
def test_client_options_and_missing_file(name, router, inputs, tmp_path):
    """--skip-logo, --skip-localization and --top-k reach the router; a missing file is a FILE_ERROR line and
    exit status 1."""
    code, lines, err = run_client(name, router.address, "--skip-logo", "--skip-localization", "--top-k", "2", inputs[0],
                                  str(tmp_path / "missing.jpg"))
    assert code == 1, err
    answer, missing = (json.loads(line) for line in lines)
    assert answer["route"] == "global_model" and len(answer["top_k"]) == 2
    assert answer["framing"] == "whole_photo" and answer["cars_found"] == 0, answer
    assert missing["image"] == str(tmp_path / "missing.jpg") and missing["error"]["code"] == "FILE_ERROR"


def test_clients_send_the_callers_box(router, no_logo_photo):
    """--box is sent as car_box with every image: the router classifies that box (framing caller_box) and
    says so; an inverted box is the router's INVALID_ARGUMENT, the same line from every client."""
    photo = str(no_logo_photo.path)
    sent = {"x_min": 0.1, "y_min": 0.1, "x_max": 0.9, "y_max": 0.9}
    answers, refusals = {}, {}
    for name in COMMANDS:
        code, lines, err = run_client(name, router.address, "--box", "0.1,0.1,0.9,0.9", photo)
        assert code == 0 and len(lines) == 1, (name, lines, err)
        answers[name] = answer = json.loads(lines[0])
        assert answer["framing"] == "caller_box", (name, answer)
        assert {k: answer["box"][k] for k in sent} == pytest.approx(sent, abs=2e-4), (name, answer["box"])
        assert answer["box"]["score"] == 0.0 and answer["label"], (name, answer)

        code, lines, err = run_client(name, router.address, "--box", "0.5,0.5,0.4,0.9", photo)
        assert code == 1 and len(lines) == 1, (name, lines, err)
        refusals[name] = json.loads(lines[0])
    for name in OTHERS:
        assert {k: answers[name][k] for k in SAME} == {k: answers["python"][k] for k in SAME}, name
        assert answers[name]["confidence"] == pytest.approx(answers["python"]["confidence"], abs=2e-4)
        assert refusals[name] == refusals["python"], (name, refusals)
    refused = refusals["python"]
    assert refused["image"] == photo and refused["error"]["code"] == "INVALID_ARGUMENT", refused
    assert "car_box" in refused["error"]["message"], refused


@pytest.mark.parametrize("name", list(COMMANDS))
def test_client_refuses_a_malformed_box(name, tmp_path):
    """A --box that is not four numbers is a usage error (exit status 2, a message), before any call."""
    photo = tmp_path / "car.jpg"
    photo.write_bytes(b"not read")
    for value in ("0.1,0.1,0.9", "0.1,0.1,0.9,0.9,1", "a,b,c,d", "0.1,,0.9,0.9", "nan,0,1,1", "1e999,0,1,1", ""):
        code, lines, err = run_client(name, "127.0.0.1:1", "--box", value, str(photo), timeout=60)
        assert code == 2 and not lines, (value, lines, err)
        assert "--box" in err and "x_min,y_min,x_max,y_max" in err, (value, err)
    code, lines, err = run_client(name, "127.0.0.1:1", str(photo), "--box", timeout=60)  # no value
    assert code == 2 and not lines, (lines, err)


def test_clients_expand_folders_like_the_python_client(router, tmp_path):
    (tmp_path / "b").mkdir()
    for rel in ("b/2.png", "a.JPG", "b/1.jpeg", "notes.txt"):
        (tmp_path / rel).write_bytes(b"not an image")
    images = {}
    for name in COMMANDS:
        code, lines, err = run_client(name, router.address, str(tmp_path) + "/")
        assert code == 1, err
        images[name] = [(json.loads(line)["image"], json.loads(line)["error"]["code"]) for line in lines]
    assert images["python"] == [(str(tmp_path / p), "INVALID_ARGUMENT") for p in ("a.JPG", "b/1.jpeg", "b/2.png")]
    assert all(found == images["python"] for found in images.values()), images


@pytest.fixture(scope="module")
def mtls_router(model_server, stack_logs, tmp_path_factory):
    """A router that serves mTLS only: clients need --ca, --cert and --key."""
    certs = make_certificates(tmp_path_factory.mktemp("client-tls"))
    router = start_router(model_server.address, "", stack_logs / "mtls", env={
        "ROUTER_TLS_CERT": str(certs / "server.pem"), "ROUTER_TLS_KEY": str(certs / "server.key"),
        "ROUTER_TLS_CLIENT_CA": str(certs / "ca.pem")})
    try:
        router.wait_healthy(credentials=grpc.ssl_channel_credentials(
            (certs / "ca.pem").read_bytes(), (certs / "client.key").read_bytes(), (certs / "client.pem").read_bytes()))
        yield router, certs
    finally:
        router.stop(signal.SIGKILL)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_client_over_mtls(name, mtls_router, no_logo_photo):
    router, c = mtls_router
    photo = str(no_logo_photo.path)
    code, lines, err = run_client(name, router.address, "--ca", str(c / "ca.pem"), "--cert", str(c / "client.pem"),
                                  "--key", str(c / "client.key"), photo)
    assert code == 0, (lines, err)
    answer = json.loads(lines[0])
    assert answer["image"] == photo and answer["label"] and answer["route"] == "global_model"
    # TLS without the client certificate, and plaintext, are refused: an error line and exit status 1
    for args in (["--ca", str(c / "ca.pem")], []):
        code, lines, err = run_client(name, router.address, "--timeout", "10", *args, photo)
        assert code == 1, (args, lines, err)
        failed = json.loads(lines[0])
        assert failed["image"] == photo and failed["error"]["code"] in ("UNAVAILABLE", "UNKNOWN", "INTERNAL"), failed


def test_the_stack_serves_reflection(model_server, logo_service, router):
    """What harness/stack.py starts (`make run`, the tests) can be listed with buf curl over reflection."""
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail("node_modules/.bin/buf is missing: run `make clients` (npm install)")
    expected = [(model_server, "tensorflow.serving.PredictionService/Predict"),
                (logo_service, "carrecog.v1.LogoService/MatchLogo"),
                (router, "carrecog.v1.RecognitionService/Recognize")]
    for service, method in expected:
        done = subprocess.run([str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-methods",
                               f"http://{service.address}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        methods = done.stdout.split()
        assert method in methods and "grpc.health.v1.Health/Check" in methods, (service.name, methods)


def test_grpcurl_lists_and_calls_the_router_without_proto_files(router, no_logo_photo):
    """The generic client people reach for first: `grpcurl -plaintext HOST:PORT list`, then a call."""
    grpcurl = ROOT / ".venv" / "bin" / "grpcurl"
    if not grpcurl.exists():
        pytest.fail(".venv/bin/grpcurl is missing: run `make dev-venv` (requirements-dev.txt)")
    listed = subprocess.run([str(grpcurl), "-plaintext", router.address, "list"], capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {"carrecog.v1.RecognitionService", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    image = base64.b64encode(no_logo_photo.path.read_bytes()).decode()
    called = subprocess.run([str(grpcurl), "-plaintext", "-d", json.dumps({"image": image, "options": {"topK": 3}}),
                             router.address, "carrecog.v1.RecognitionService/Recognize"],
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0, called.stderr
    answer = json.loads(called.stdout)
    top_k = answer.get("topK", answer.get("top_k"))  # grpcurl versions differ in JSON field naming
    assert answer["make"] and answer["route"].startswith("ROUTE_") and len(top_k) == 3
