"""carrecog.v1.LogoService over gRPC: MatchLogo and ListBrands.

The transport (health, reflection, limits, TLS, graceful shutdown, request ids)
comes from common.server; this module only adds the logo settings, the
servicer, and the warm-up that decides when health says SERVING.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import grpc
import numpy as np

from carrecog.v1 import logo_service_pb2 as pb
from carrecog.v1 import logo_service_pb2_grpc as pb_grpc
from common.errors import InvalidArgument, Unavailable
from common.images import DEFAULT_MAX_BYTES, InvalidImage, validate_image
from common.logs import log_event
from common.server import DEFAULT_PORTS, GrpcServer, ServerSettings, add_server_arguments, env
from logo_service.gallery import DEFAULT_ARTIFACT_DIR, load_artifact
from logo_service.matcher import Candidate, LogoMatcher, MatchResult, UndecodableImage

logger = logging.getLogger("carrecog.logo")

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.json"
DEFAULT_CANDIDATES = 5
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LogoService"].full_name


@dataclass(frozen=True)
class LogoSettings:
    """Everything the logo service reads from flags / environment, once, at start."""

    server: ServerSettings
    gallery_dir: Path  # the artifact `make gallery` builds: gallery.npz + manifest.json
    min_inliers: int
    calibrated_on: str | None  # fingerprint of the gallery the gate was calibrated on
    gate_source: str  # where min_inliers came from, for the start-up log
    workers: int
    max_image_bytes: int
    log_level: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, "LOGO", DEFAULT_PORTS["LOGO"])
    parser.add_argument("--gallery-dir", type=Path, default=Path(env("LOGO_GALLERY_DIR", str(DEFAULT_ARTIFACT_DIR))),
                        help="the gallery artifact built by `make gallery` ($LOGO_GALLERY_DIR)")
    parser.add_argument("--min-inliers", type=int, default=env("LOGO_MIN_INLIERS"),
                        help="acceptance gate; default: the calibrated one in calibration.json ($LOGO_MIN_INLIERS)")
    parser.add_argument("--calibration", type=Path, default=Path(env("LOGO_CALIBRATION", str(DEFAULT_CALIBRATION))),
                        help="calibration.json that holds the gate ($LOGO_CALIBRATION)")
    parser.add_argument("--workers", type=int, default=int(env("LOGO_WORKERS", str(os.cpu_count() or 2))),
                        help="threads that run SIFT matching ($LOGO_WORKERS)")
    parser.add_argument("--max-image-mb", type=float,
                        default=float(env("LOGO_MAX_IMAGE_MB", str(DEFAULT_MAX_BYTES / 2**20))),
                        help="largest accepted image in MiB ($LOGO_MAX_IMAGE_MB)")


def settings_from_args(args: argparse.Namespace) -> LogoSettings:
    calibrated_on = None
    if args.min_inliers is not None:
        min_inliers, source = int(args.min_inliers), "LOGO_MIN_INLIERS / --min-inliers"
    else:
        try:
            report = json.loads(args.calibration.read_text())
            min_inliers = int(report["gate"]["min_inliers"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{args.calibration}: no calibrated gate ({exc}); run "
                             "`python -m builders.logo_calibrate` or set LOGO_MIN_INLIERS") from exc
        source, calibrated_on = str(args.calibration), report.get("gallery", {}).get("fingerprint")
    if min_inliers < 1:
        raise ValueError(f"min inliers must be >= 1, got {min_inliers}")
    if args.workers < 1:
        raise ValueError(f"LOGO_WORKERS must be >= 1, got {args.workers}")
    return LogoSettings(
        server=ServerSettings.from_args(args),
        gallery_dir=args.gallery_dir,
        min_inliers=min_inliers,
        calibrated_on=calibrated_on,
        gate_source=source,
        workers=args.workers,
        max_image_bytes=int(args.max_image_mb * 2**20),
        log_level=args.log_level,
    )


def _match_pb(c: Candidate) -> pb.LogoMatch:
    return pb.LogoMatch(brand=c.brand, brand_name=c.brand_name, inliers=c.inliers, good_matches=c.good_matches,
                        score=c.score, exemplar=c.exemplar,
                        box=pb.BoundingBox(x_min=c.box.x_min, y_min=c.box.y_min, x_max=c.box.x_max, y_max=c.box.y_max))


def response_from(result: MatchResult, min_inliers: int, max_candidates: int) -> pb.MatchLogoResponse:
    best = result.best
    reply = pb.MatchLogoResponse(matched=best is not None and best.inliers >= min_inliers,
                                 min_inliers=min_inliers, query_keypoints=result.query_keypoints,
                                 match_ms=result.match_ms)
    if best is not None:
        reply.best.CopyFrom(_match_pb(best))
    reply.candidates.extend(_match_pb(c) for c in result.candidates[:max_candidates])
    return reply


class LogoServicer(pb_grpc.LogoServiceServicer):
    def __init__(self, settings: LogoSettings, executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.executor = executor
        self.matcher: LogoMatcher | None = None  # set once the gallery is loaded

    async def MatchLogo(self, request: pb.MatchLogoRequest, context: grpc.aio.ServicerContext) -> pb.MatchLogoResponse:
        matcher = self._ready_matcher()
        if request.max_candidates < 0:
            raise InvalidArgument("max_candidates must be >= 0 (0 means 5)")
        try:
            validate_image(request.image, self.settings.max_image_bytes)
            # SIFT takes tens of ms of CPU: off the event loop, onto the pool.
            result = await asyncio.get_running_loop().run_in_executor(self.executor, matcher.match, request.image)
        except (InvalidImage, UndecodableImage) as exc:
            raise InvalidArgument(str(exc)) from None
        return response_from(result, self.settings.min_inliers, request.max_candidates or DEFAULT_CANDIDATES)

    async def ListBrands(self, request: pb.ListBrandsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListBrandsResponse:
        g = self._ready_matcher().gallery
        brands = [pb.Brand(slug=str(s), name=str(n), exemplars=e, descriptors=d)
                  for s, n, (e, d) in zip(g.brand_slugs, g.brand_names, g.brand_counts())]
        return pb.ListBrandsResponse(brands=brands, min_inliers=self.settings.min_inliers)

    def _ready_matcher(self) -> LogoMatcher:
        if self.matcher is None:
            raise Unavailable("the logo gallery is still loading; retry shortly")
        return self.matcher


def load_matcher(settings: LogoSettings) -> LogoMatcher:
    """The gallery artifact -> matcher, warmed by one match. Reads no training photo."""
    gallery, manifest = load_artifact(settings.gallery_dir)
    if settings.calibrated_on and settings.calibrated_on != gallery.fingerprint:
        log_event(logger, "gate calibrated on another gallery", logging.WARNING, gallery=gallery.fingerprint,
                  calibrated_on=settings.calibrated_on, hint="run `python -m builders.logo_calibrate`")
    log_event(logger, "gallery loaded", folder=str(settings.gallery_dir), fingerprint=gallery.fingerprint,
              built_at=manifest.get("built_at"), command=manifest.get("command"))
    matcher = LogoMatcher(gallery)
    # First call pays for lazy allocations; do it before saying SERVING.
    noise = np.random.default_rng(0).integers(0, 255, (240, 320), dtype=np.uint8)
    ok, png = cv2.imencode(".png", noise)
    matcher.match(png.tobytes())
    return matcher


async def serve(settings: LogoSettings) -> None:
    cv2.setNumThreads(1)  # parallelism comes from the worker pool, not from inside OpenCV
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="logo-match")
    server = GrpcServer("logo", settings.server, [SERVICE_NAME])
    servicer = LogoServicer(settings, executor)
    pb_grpc.add_LogoServiceServicer_to_server(servicer, server.server)
    await server.start()  # health answers NOT_SERVING while the gallery loads
    loop = asyncio.get_running_loop()
    servicer.matcher = await loop.run_in_executor(executor, load_matcher, settings)
    g = servicer.matcher.gallery
    log_event(logger, "ready", gallery=g.fingerprint, descriptors=int(len(g.descriptors)),
              exemplars=int(len(g.exemplar_names)), brands=[str(s) for s in g.brand_slugs],
              min_inliers=settings.min_inliers, gate_source=settings.gate_source, workers=settings.workers)
    await server.set_serving(True)
    try:
        await server.wait_for_shutdown()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
