"""Match one photo against the whole logo gallery: SIFT, one FLANN index, ratio tests, RANSAC.

Pure synchronous code; the gRPC server runs `LogoMatcher.match` in a thread
pool so SIFT never blocks its event loop.

Pipeline, and why each step:
1. SIFT on the photo (shrunk to MAX_SIDE first; keypoints mapped back to the
   original pixels, so the box is in the caller's coordinates); only the
   `sift_nfeatures` strongest keypoints get descriptors and are searched.
2. k nearest gallery keypoints from ONE FLANN index over every brand's
   exemplars: one search per photo however many brands there are.
3. A neighbour is a good match when (a) it belongs to the same brand as the
   nearest neighbour and is clearly closer than the nearest keypoint of any
   other brand (Lowe's ratio test, made brand-aware so that many exemplars of
   the same emblem do not veto each other), and (b) it is clearly closer than
   the gallery keypoint's own nearest descriptor among the other makes' train
   photos (`neg_distance`), so generic structure (wheels, glass, tarmac) that
   every car has does not count.
4. Good matches are grouped by exemplar; the exemplars with most matches are
   verified with a RANSAC homography; inliers are counted as distinct points.
5. Candidates are the best exemplar per brand, ranked by inliers.

Every match records how long each step took (`MatchResult.steps_ms`, keys in
STEPS); scripts/profile_logo.py aggregates them over val photos.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from logo_service.features import (FLANN_SEED, MAX_SIDE, SIFT_CONTRAST, Features, decode_gray, flann_index,
                                   load_flann_index, sift_features, to_matching_space)
from logo_service.gallery import Gallery, SavedIndex


# The steps `MatchResult.steps_ms` times, in pipeline order.
STEPS = ("decode", "sift", "knn", "ratio", "ransac")


class StepClock:
    """Adds the time since the previous mark to a named step (perf_counter: ~0.1 us per mark)."""

    __slots__ = ("steps", "_last")

    def __init__(self, started: float) -> None:
        self.steps = dict.fromkeys(STEPS, 0.0)
        self._last = started

    def mark(self, step: str) -> None:
        now = time.perf_counter()
        self.steps[step] += (now - self._last) * 1000.0
        self._last = now


@dataclass(frozen=True)
class MatcherParams:
    neighbors: int = 16  # k for the gallery search (16 beat 8 on val: more same-brand exemplars per keypoint)
    ratio: float = 0.9  # to the nearest keypoint of another brand in the gallery
    neg_ratio: float = 0.9  # to the keypoint's nearest other-make train descriptor
    candidates: int = 8  # exemplars verified with RANSAC per photo
    min_matches: int = 5  # an exemplar needs this many good matches to be verified
    ransac_px: float = 5.0  # reprojection threshold, in pixels of the (shrunk) photo SIFT saw
    flann_checks: int = 32
    max_side: int = MAX_SIDE
    sift_contrast: float = SIFT_CONTRAST  # query-side SIFT contrast threshold (OpenCV's default 0.04)
    # Query-side keypoint budget, strongest responses first (0 = all). 250 keeps every val
    # firing of "all" (scripts/profile_logo.py --sweep: 17/17 at gate 8, 225 loses one,
    # 200 loses five) and cuts SIFT descriptors and the gallery search by a third.
    sift_nfeatures: int = 250
    sift_layers: int = 3  # query-side SIFT scales per octave (OpenCV's default 3)
    flann_trees: int = 4  # kd-forest size of the gallery index
    flann_kmeans_branching: int = 0  # > 0: a hierarchical k-means index instead of the kd-forest

    def index_key(self) -> dict:
        """What the gallery index is built with: a saved index is loaded only under the same key."""
        return {"trees": self.flann_trees, "kmeans_branching": self.flann_kmeans_branching, "seed": FLANN_SEED,
                "opencv": cv2.__version__}


@dataclass(frozen=True)
class Box:
    x_min: int
    y_min: int
    x_max: int
    y_max: int


@dataclass(frozen=True)
class Candidate:
    brand: str
    brand_name: str
    inliers: int
    good_matches: int
    score: float  # inliers / good_matches of the winning exemplar
    box: Box
    exemplar: str


@dataclass(frozen=True)
class MatchResult:
    candidates: list[Candidate]  # best exemplar per brand, most inliers first
    query_keypoints: int
    width: int
    height: int
    match_ms: float
    # ms per step (STEPS: decode, sift, knn, ratio, ransac); they add up to match_ms
    # minus a few microseconds of bookkeeping. decode is 0 for match_gray.
    steps_ms: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def runner_up_inliers(self) -> int:
        """Inliers of the best OTHER brand (0 if none): the margin a gate may demand."""
        return self.candidates[1].inliers if len(self.candidates) > 1 else 0


class UndecodableImage(ValueError):
    """OpenCV could not decode the bytes (the header looked fine but the pixels did not)."""


class LogoMatcher:
    """Holds the gallery and its FLANN index; `match` may be called from several threads."""

    def __init__(self, gallery: Gallery, params: MatcherParams = MatcherParams(),
                 saved_index: SavedIndex | None = None) -> None:
        self.gallery = gallery
        self.params = params
        self._brand_of_kp = gallery.exemplar_brand[gallery.exemplar]
        self._xy = gallery.xy
        self._neg = gallery.neg_distance
        # FLANN searches these arrays in place: keep them alive as long as the index.
        self._space = to_matching_space(gallery.descriptors)
        # The index is built once (or loaded, when the artifact carries one built with the same
        # parameters); searching it does not modify it.
        self._index = None
        if saved_index is not None and saved_index.key == params.index_key():
            self._index = load_flann_index(self._space, saved_index.path)
        self.index_loaded = self._index is not None
        if self._index is None:
            self._index = flann_index(self._space, params.flann_trees, params.flann_kmeans_branching)

    def save_index(self, path: Path) -> None:
        """Save the gallery index (what `make gallery` ships beside the gallery); replaced whole."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self._index.save(str(tmp))
        tmp.replace(path)

    def match(self, image_bytes: bytes) -> MatchResult:
        started = time.perf_counter()
        clock = StepClock(started)
        gray = decode_gray(image_bytes)
        clock.mark("decode")
        if gray is None:
            raise UndecodableImage("OpenCV could not decode the image pixels: send a valid JPEG or PNG")
        return self._match(gray, started, clock)

    def match_gray(self, gray: np.ndarray, started: float | None = None) -> MatchResult:
        started = time.perf_counter() if started is None else started
        return self._match(gray, started, StepClock(started))

    def match_features(self, feats: Features, started: float | None = None) -> MatchResult:
        """Everything after SIFT, on features computed once (the profiler sweeps many settings over one pass)."""
        started = time.perf_counter() if started is None else started
        return self._match_features(feats, started, StepClock(started))

    def _match(self, gray: np.ndarray, started: float, clock: StepClock) -> MatchResult:
        p = self.params
        feats = sift_features(gray, p.max_side, p.sift_contrast, p.sift_nfeatures, p.sift_layers)
        clock.mark("sift")
        return self._match_features(feats, started, clock)

    def _match_features(self, feats: Features, started: float, clock: StepClock) -> MatchResult:
        """Everything after SIFT, timed on `clock`."""
        candidates = (self._candidates(feats.xy, feats.scale, feats.descriptors, feats.width, feats.height, clock)
                      if len(feats.xy) >= 2 else [])
        ms = (time.perf_counter() - started) * 1000.0
        return MatchResult(candidates, len(feats.xy), feats.width, feats.height, ms, clock.steps)

    def _good_matches(self, desc: np.ndarray, clock: StepClock) -> tuple[np.ndarray, np.ndarray]:
        """(query index, gallery index) pairs that pass both ratio tests."""
        p = self.params
        k = min(p.neighbors, len(self._xy))
        nn, sq = self._index.knnSearch(to_matching_space(desc), k, params=dict(checks=p.flann_checks))
        clock.mark("knn")
        dist = np.sqrt(np.maximum(sq, 0.0))
        brand = self._brand_of_kp[nn]
        same = brand == brand[:, :1]
        # Nearest other-brand keypoint; when all k neighbours share a brand it is
        # at least as far as the k-th one, so use that (a conservative bound).
        d_other = np.where(same, np.inf, dist).min(axis=1)
        d_other = np.where(np.isinf(d_other), dist[:, -1] / p.ratio + 1e-6, d_other)
        ok = same & (dist < p.ratio * d_other[:, None]) & (dist < p.neg_ratio * self._neg[nn])
        qi, col = np.nonzero(ok)
        return qi, nn[qi, col]

    def _candidates(self, qxy: np.ndarray, scale: float, desc: np.ndarray, w: int, h: int,
                    clock: StepClock) -> list[Candidate]:
        """Best verified exemplar per brand. qxy: original pixels; scale: SIFT's working size / original."""
        p, g = self.params, self.gallery
        qi, gi = self._good_matches(desc, clock)
        if len(qi) == 0:
            clock.mark("ratio")
            return []
        ex = g.exemplar[gi]
        # One correspondence per (query keypoint, exemplar): the nearest one.
        _, first = np.unique(qi.astype(np.int64) * len(g.exemplar_names) + ex, return_index=True)
        qi, gi, ex = qi[first], gi[first], ex[first]
        ids, counts = np.unique(ex, return_counts=True)
        order = np.argsort(-counts, kind="stable")[: p.candidates]
        clock.mark("ratio")
        best: dict[int, Candidate] = {}
        for e, n in zip(ids[order], counts[order]):
            if n < p.min_matches:
                break
            rows = ex == e
            verified = self._verify(qxy[qi[rows]], scale, self._xy[gi[rows]], w, h)
            if verified is None:
                continue
            inliers, box = verified
            b = int(g.exemplar_brand[e])
            if b not in best or inliers > best[b].inliers:
                best[b] = Candidate(brand=str(g.brand_slugs[b]), brand_name=str(g.brand_names[b]),
                                    inliers=inliers, good_matches=int(n), score=inliers / int(n),
                                    box=box, exemplar=str(g.exemplar_names[e]))
        clock.mark("ransac")
        return sorted(best.values(), key=lambda c: (-c.inliers, -c.score))

    def _verify(self, src: np.ndarray, scale: float, dst: np.ndarray, w: int, h: int) -> tuple[int, Box] | None:
        """RANSAC homography exemplar -> photo; distinct inlier count and their box, or None.

        RANSAC and the distinct-point count work at SIFT's working scale, where
        the threshold was calibrated; only the box is in original pixels.
        """
        work = src * np.float32(scale)
        H, mask = cv2.findHomography(dst, work, cv2.RANSAC, self.params.ransac_px)
        if H is None or mask is None:
            return None
        # A mirror image or a collapse to a line is never a real emblem.
        det = float(np.linalg.det(H[:2, :2]))
        if not (1e-3 < det < 1e3):
            return None
        inl = mask.ravel().astype(bool)
        # SIFT puts several keypoints (orientations) at one spot; count spots.
        inliers = min(len(np.unique(np.round(work[inl]), axis=0)), len(np.unique(np.round(dst[inl]), axis=0)))
        pts = src[inl]
        if inliers == 0:
            return None
        x0, y0 = np.floor(pts.min(axis=0)).astype(int)
        x1, y1 = np.ceil(pts.max(axis=0)).astype(int)
        box = Box(max(0, int(x0)), max(0, int(y0)), min(w - 1, int(x1)), min(h - 1, int(y1)))
        return inliers, box
