"""SIFT keypoints for the logo gallery and for query photos, computed one way.

The gallery and the query side must see images the same way (grey levels,
size limit, SIFT settings), otherwise descriptors drift apart; so both call
`sift_features` from here.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Query photos larger than this (longer side, px) are shrunk before SIFT: the
# shared photos are <= 400 px, so 640 keeps them untouched while a 12 MP phone
# photo costs ~10x less. SIFT is scale invariant, so emblems still match.
MAX_SIDE = 640
FLANN_SEED = 20261124  # see flann_index
SIFT_CONTRAST = 0.04  # OpenCV's default contrast threshold; the gallery is built with it


@dataclass(frozen=True)
class Features:
    """Keypoints of one image: xy in the ORIGINAL image's pixels, descriptors float32."""

    xy: np.ndarray  # (n, 2) float32
    descriptors: np.ndarray  # (n, 128) float32
    scale: float  # processed size / original size (<= 1)
    width: int  # original width
    height: int  # original height


_LOCAL = threading.local()


def _sift(contrast: float = SIFT_CONTRAST, nfeatures: int = 0, layers: int = 3) -> cv2.SIFT:
    # One detector per thread and setting: the server matches in a thread pool, and
    # an OpenCV algorithm object is not documented as safe to share across threads.
    cache = getattr(_LOCAL, "sift", None)
    if cache is None:
        cache = _LOCAL.sift = {}
    key = (contrast, nfeatures, layers)
    sift = cache.get(key)
    if sift is None:
        sift = cache[key] = cv2.SIFT_create(nfeatures=nfeatures, nOctaveLayers=layers, contrastThreshold=contrast)
    return sift


def decode_gray(data: bytes) -> np.ndarray | None:
    """Encoded bytes -> 8-bit grey image, or None when OpenCV cannot decode them."""
    buf = np.frombuffer(data, dtype=np.uint8)
    return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if buf.size else None


def logo_gray(path: str, canvas: int = 400) -> np.ndarray:
    """Logo artwork (often a transparent PNG) flattened onto white, longer side = canvas.

    Transparent pixels would otherwise turn black and blend into dark logos.
    """
    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"cannot read logo image {path}")
    if img.ndim == 2:
        gray = img
    elif img.shape[2] == 4:
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        rgb = img[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        gray = cv2.cvtColor(rgb.astype(np.uint8), cv2.COLOR_BGR2GRAY)
    else:
        gray = cv2.cvtColor(img[:, :, :3], cv2.COLOR_BGR2GRAY)
    # Pad so SIFT finds corners at the artwork's border too.
    gray = cv2.copyMakeBorder(gray, 16, 16, 16, 16, cv2.BORDER_CONSTANT, value=255)
    s = canvas / max(gray.shape)
    return cv2.resize(gray, None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def sift_features(gray: np.ndarray, max_side: int = MAX_SIDE, contrast: float = SIFT_CONTRAST,
                  nfeatures: int = 0, layers: int = 3) -> Features:
    """SIFT on a grey image, shrunk to max_side first; xy mapped back to original pixels.

    contrast: SIFT's contrast threshold; a higher one keeps fewer, stronger
    keypoints (the same descriptors for those it keeps), so a query may use it
    to spend less on descriptors and on the gallery search. nfeatures > 0 keeps
    only that many (the strongest responses); 0 keeps all. layers: scales per
    octave (OpenCV's default 3; fewer means fewer Gaussian blurs).
    """
    h, w = gray.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    work = gray if scale == 1.0 else cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                                                interpolation=cv2.INTER_AREA)
    keypoints, desc = _sift(contrast, nfeatures, layers).detectAndCompute(work, None)
    if desc is None or not keypoints:
        return Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), scale, w, h)
    # Per-axis factors: the shrunk size was rounded to whole pixels.
    factors = np.array([w / work.shape[1], h / work.shape[0]], dtype=np.float32)
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32) * factors
    return Features(xy, desc.astype(np.float32, copy=False), scale, w, h)


def to_matching_space(descriptors: np.ndarray) -> np.ndarray:
    """SIFT descriptors as float32 RootSIFT (Arandjelovic & Zisserman 2012).

    L1-normalise then square-root: Euclidean distance then compares histograms
    with the Hellinger kernel, which matches more true pairs for the same
    number of false ones. The gallery keeps raw uint8 SIFT; this runs at load.
    """
    d = descriptors.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-6)
    return np.sqrt(d, out=d)  # in place: the gallery's copy is 350 MB


def flann_index(descriptors: np.ndarray, trees: int = 4, kmeans_branching: int = 0) -> cv2.flann_Index:
    """A FLANN randomised kd-forest over float32 descriptors, the same on every run.

    FLANN draws its split dimensions from OpenCV's per-thread RNG; seeding it
    right before the build makes galleries and match results reproducible, so
    a gate calibrated on one machine means the same on another.
    kmeans_branching > 0 builds a hierarchical k-means tree instead (slower to
    build, more true neighbours per leaf checked).
    """
    cv2.setRNGSeed(FLANN_SEED)
    if kmeans_branching > 0:
        return cv2.flann_Index(descriptors, dict(algorithm=2, branching=kmeans_branching, iterations=5))
    return cv2.flann_Index(descriptors, dict(algorithm=1, trees=trees))


def load_flann_index(descriptors: np.ndarray, path: Path) -> cv2.flann_Index | None:
    """The index saved at `path` over these very descriptors, or None when it cannot be read.

    FLANN saves the index's trees, not the data: loading takes the same descriptors, in the
    same order, and about 0.4 s instead of the 4 s a build takes."""
    index = cv2.flann_Index()
    try:
        return index if index.load(descriptors, str(path)) else None
    except cv2.error:
        return None
