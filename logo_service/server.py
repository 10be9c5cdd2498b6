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
from common.data import data_dir
from common.images import DEFAULT_MAX_BYTES, InvalidImage, validate_image
from common.logs import log_event
from common.plugins import DEFAULT_PLUGINS_DIR
from common.server import GrpcServer, ServerSettings, add_server_arguments, env
from logo_service.gallery import DEFAULT_CACHE_DIR, Gallery, load_or_build
from logo_service.matcher import Candidate, LogoMatcher, MatchResult, UndecodableImage

logger = logging.getLogger("carrecog.logo")

DEFAULT_PORT = 50051
DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.json"
DEFAULT_CANDIDATES = 5
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LogoService"].full_name


@dataclass(frozen=True)
class LogoSettings:
    """Everything the logo service reads from flags / environment, once, at start."""

    server: ServerSettings
    plugins_dir: Path
    data_dir: Path
    cache_dir: Path
    gallery_file: Path | None  # a prebuilt gallery .npz; skips the fingerprint lookup
    min_inliers: int
    gate_source: str  # where min_inliers came from, for the start-up log
    workers: int
    max_image_bytes: int
    log_level: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser, "LOGO", DEFAULT_PORT)
    plugins_default = env("LOGO_PLUGINS_DIR", env("CARRECOG_PLUGINS_DIR", str(DEFAULT_PLUGINS_DIR)))
    parser.add_argument("--plugins-dir", type=Path, default=Path(plugins_default),
                        help="brand plugin folders ($LOGO_PLUGINS_DIR, else $CARRECOG_PLUGINS_DIR)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="shared data root with stanford_cars/ and car_logos/ ($CARRECOG_DATA_DIR)")
    parser.add_argument("--cache-dir", type=Path, default=Path(env("LOGO_CACHE_DIR", str(DEFAULT_CACHE_DIR))),
                        help="where the built gallery is cached ($LOGO_CACHE_DIR)")
    parser.add_argument("--gallery-file", type=Path, default=env("LOGO_GALLERY_FILE"),
                        help="load this gallery .npz instead of the cached/built one ($LOGO_GALLERY_FILE)")
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
    if args.min_inliers is not None:
        min_inliers, source = int(args.min_inliers), "LOGO_MIN_INLIERS / --min-inliers"
    else:
        try:
            min_inliers = int(json.loads(args.calibration.read_text())["gate"]["min_inliers"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{args.calibration}: no calibrated gate ({exc}); run "
                             "`python -m logo_service.calibrate` or set LOGO_MIN_INLIERS") from exc
        source = str(args.calibration)
    if min_inliers < 1:
        raise ValueError(f"min inliers must be >= 1, got {min_inliers}")
    if args.workers < 1:
        raise ValueError(f"LOGO_WORKERS must be >= 1, got {args.workers}")
    return LogoSettings(
        server=ServerSettings.from_args(args),
        plugins_dir=args.plugins_dir,
        data_dir=args.data_dir or data_dir(),
        cache_dir=args.cache_dir,
        gallery_file=Path(args.gallery_file) if args.gallery_file else None,
        min_inliers=min_inliers,
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
        if self.matcher is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the logo gallery is still loading; retry shortly")
        if request.max_candidates < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_candidates must be >= 0 (0 means 5)")
        try:
            validate_image(request.image, self.settings.max_image_bytes)
        except InvalidImage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        loop = asyncio.get_running_loop()
        try:
            # SIFT takes tens of ms of CPU: off the event loop, onto the pool.
            result = await loop.run_in_executor(self.executor, self.matcher.match, request.image)
        except UndecodableImage as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return response_from(result, self.settings.min_inliers, request.max_candidates or DEFAULT_CANDIDATES)

    async def ListBrands(self, request: pb.ListBrandsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListBrandsResponse:
        if self.matcher is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the logo gallery is still loading; retry shortly")
        g = self.matcher.gallery
        brands = [pb.Brand(slug=str(s), name=str(n), exemplars=e, descriptors=d)
                  for s, n, (e, d) in zip(g.brand_slugs, g.brand_names, g.brand_counts())]
        return pb.ListBrandsResponse(brands=brands, min_inliers=self.settings.min_inliers)


def load_matcher(settings: LogoSettings) -> LogoMatcher:
    """Gallery (cached, or built: minutes on a fresh machine) -> matcher, warmed by one match."""
    if settings.gallery_file is not None:
        gallery = Gallery.load(settings.gallery_file)
    else:
        gallery = load_or_build(settings.plugins_dir, settings.data_dir, settings.cache_dir)
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
