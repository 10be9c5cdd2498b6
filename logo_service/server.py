"""carrecog.v1.LogoService over gRPC: MatchLogo and ListBrands.

The transport (health, reflection, limits, TLS, graceful shutdown, request ids)
comes from common.server and the settings from logo_service.settings; this module adds the
servicer, and the warm-up that decides when health says SERVING.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import cv2
import grpc
import numpy as np

from carrecog.v1 import logo_service_pb2 as pb
from carrecog.v1 import logo_service_pb2_grpc as pb_grpc
from common.errors import InvalidArgument, Unavailable
from common.images import InvalidImage, validate_image
from common.logs import log_event
from common.server import GrpcServer
from logo_service.gallery import load_artifact, saved_index
from logo_service.matcher import Candidate, LogoMatcher, MatchResult, UndecodableImage
from logo_service.settings import DEFAULT_CANDIDATES, LogoSettings

logger = logging.getLogger("carrecog.logo")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LogoService"].full_name


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
    matcher = LogoMatcher(gallery, saved_index=saved_index(settings.gallery_dir, gallery, manifest))
    log_event(logger, "matcher index", loaded=matcher.index_loaded,
              how="loaded from the artifact" if matcher.index_loaded else "built (the artifact has no matching index)")
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
