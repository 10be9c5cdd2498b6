"""python -m client IMAGE_OR_FOLDER... : recognise photos with a running router.

Prints one JSON object per image (image, make, model, year, label, confidence,
route, box, framing, verdict, top_k, ...) on stdout; a failed image prints {"image", "error"}
and the command exits 1 after the others are done.

    python -m client --address localhost:50050 car.jpg photos/
    python -m client --box 0.1,0.2,0.9,0.95 car.jpg    # classify that box (fractions of width, height)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Iterable, TextIO

import grpc

from carrecog.v1 import recognition_service_pb2 as pb
from carrecog.v1 import recognition_service_pb2_grpc as pb_grpc
from common.channels import tls_credentials
from common.server import DEFAULT_ROUTER_ADDRESS

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
# One number of --box, as every client reads it: plain decimal, optional sign and exponent.
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def expand(paths: Iterable[str]) -> list[Path]:
    """Files as given; folders expand to their JPEG/PNG files, sorted."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(path)
    return found


def parse_box(text: str) -> pb.Box:
    """--box x_min,y_min,x_max,y_max: four finite numbers (their range is the router's to check)."""
    parts = [part.strip(" ") for part in text.split(",")]
    values = [float(part) for part in parts if NUMBER.fullmatch(part)]
    if len(parts) != 4 or len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected x_min,y_min,x_max,y_max (four numbers, fractions of the "
                                         f"width and height), got {json.dumps(text)}")
    return pb.Box(x_min=values[0], y_min=values[1], x_max=values[2], y_max=values[3])


def to_json(image: Path, response: pb.RecognizeResponse) -> dict:
    return {
        "image": str(image),
        "make": response.make,
        "model": response.model,
        "year": response.year,
        "label": response.label,
        "confidence": round(response.confidence, 4),
        "make_confidence": round(response.make_confidence, 4),
        "route": pb.Route.Name(response.route).removeprefix("ROUTE_").lower(),
        "route_detail": response.route_detail,
        "box": {"x_min": round(response.box.x_min, 4), "y_min": round(response.box.y_min, 4),
                "x_max": round(response.box.x_max, 4), "y_max": round(response.box.y_max, 4),
                "score": round(response.box_score, 4)},
        "cars_found": response.cars_found,
        "framing": pb.Framing.Name(response.framing).removeprefix("FRAMING_").lower(),
        "verdict": pb.Verdict.Name(response.verdict).removeprefix("VERDICT_").lower(),
        "verdict_score": round(response.verdict_score, 4),
        "verdict_threshold": round(response.verdict_threshold, 4),
        "model_name": response.model_name,
        "model_version": response.model_version,
        "logo": ({"brand": response.logo.brand, "inliers": response.logo.inliers, "matched": response.logo_matched}
                 if response.logo.brand else None),
        "top_k": [{"label": p.label, "confidence": round(p.confidence, 4)} for p in response.top_k],
        "ms": {t.stage: round(t.ms, 1) for t in response.timings},
    }


def channel_for(address: str, ca_file: str | None, cert_file: str | None, key_file: str | None) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    if not ca_file:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls_credentials(ca_file, cert_file, key_file), options=options)


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--address", default=os.environ.get("ROUTER_ADDRESS", DEFAULT_ROUTER_ADDRESS),
                        help="router host:port ($ROUTER_ADDRESS)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--skip-logo", action="store_true", help="go straight to the global model")
    parser.add_argument("--model", default="", help="force a TF Serving model by name")
    parser.add_argument("--box", type=parse_box, metavar="X_MIN,Y_MIN,X_MAX,Y_MAX",
                        help="the car's box in every image, in fractions of width and height: the router crops and "
                             "classifies it, no localisation")
    parser.add_argument("--skip-localization", action="store_true", help="classify the whole photo, no crop")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per image in seconds")
    parser.add_argument("--ca", default=os.environ.get("ROUTER_TLS_CA"), help="CA PEM: use TLS ($ROUTER_TLS_CA)")
    parser.add_argument("--cert", default=os.environ.get("ROUTER_TLS_CLIENT_CERT"), help="client cert for mTLS")
    parser.add_argument("--key", default=os.environ.get("ROUTER_TLS_CLIENT_KEY"), help="client key for mTLS")
    args = parser.parse_args(argv)

    images = expand(args.images)
    if not images:
        parser.error("no JPEG or PNG files found in the given paths")
    failures = 0
    with channel_for(args.address, args.ca, args.cert, args.key) as channel:
        stub = pb_grpc.RecognitionServiceStub(channel)
        options = pb.RecognizeOptions(top_k=args.top_k, skip_logo=args.skip_logo, force_model=args.model,
                                      skip_localization=args.skip_localization)
        for image in images:
            try:
                request = pb.RecognizeRequest(image=image.read_bytes(), image_id=str(image), options=options)
                if args.box is not None:
                    request.car_box.CopyFrom(args.box)
                line = to_json(image, stub.Recognize(request, timeout=args.timeout))
            except OSError as exc:
                failures += 1
                line = {"image": str(image), "error": {"code": "FILE_ERROR", "message": str(exc)}}
            except grpc.RpcError as exc:
                failures += 1
                line = {"image": str(image), "error": {"code": exc.code().name, "message": exc.details()}}
            print(json.dumps(line), file=out, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
