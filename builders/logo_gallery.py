"""Build the logo gallery offline, from TRAIN photos plus the plugins' logo artwork, into its artifact.

    python -m builders.logo_gallery build [--out artifacts/logo_gallery] [--force]
    python -m builders.logo_gallery info

Why photos and not only artwork: flat logo artwork hardly matches a chrome
emblem photographed at an angle (measured: 4 % of photos fired, 1 in 4 right).
Emblems, grilles and badges as they look in real train photos match far better.

Every train photo gives SIFT keypoints: plugin brands' photos become
exemplars, the other makes' photos only tell which descriptors are NOT brand
specific (`neg_distance`: the distance to the nearest descriptor from a train
photo of another make). Per exemplar only the most brand-distinctive keypoints
are kept (neg_distance / distance to the nearest same-brand keypoint of another
photo), so the gallery stays small and fast.

Mining takes minutes, so a built gallery is also cached under
$CARRECOG_CACHE_DIR/logo_gallery/ (default ~/.cache/carrecog), named by a
fingerprint of plugins + photos + parameters + OpenCV version: a fresh clone
on the same machine reuses it, and it is rebuilt when anything it depends on
changes. The service never reads the cache, only the artifact.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from common.plugins import DEFAULT_PLUGINS_DIR, BrandPlugin, load_plugins
from logo_service.features import flann_index, logo_gray, sift_features, to_matching_space
from logo_service.gallery import (ARTIFACT_FORMAT, DEFAULT_ARTIFACT_DIR, GALLERY_FILE, INDEX_FILE, MANIFEST_FILE,
                                  Gallery, load_artifact, saved_index)
from logo_service.matcher import LogoMatcher, MatcherParams
from dataset.split import Photo, data_dir, load_split

logger = logging.getLogger("carrecog.logo.gallery")

FORMAT_VERSION = 2  # bump when the build logic changes in a way the parameters do not capture
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "logo_service" / "calibration.json"


def default_cache_dir() -> Path:
    """Outside the checkout by default, like pip's cache: a fresh clone on the same machine
    (CI, a second worktree) reuses a gallery whose fingerprint matches instead of re-mining."""
    return Path(os.environ.get("CARRECOG_CACHE_DIR") or Path.home() / ".cache" / "carrecog") / "logo_gallery"


@dataclass(frozen=True)
class GalleryParams:
    max_keypoints_per_exemplar: int = 150  # keeps the gallery under ~300k descriptors
    min_keypoints_per_exemplar: int = 12  # fewer cannot reach a sane inlier gate
    mining_neighbors: int = 16  # k for the mining k-NN over all train descriptors
    mining_checks: int = 32  # FLANN leaf checks for mining


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint(plugins: dict[str, BrandPlugin], photos: Sequence[Photo], params: GalleryParams) -> str:
    """Changes whenever the gallery would come out different."""
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "params": asdict(params), "opencv": cv2.__version__}).encode())
    for slug in sorted(plugins):
        p = plugins[slug]
        h.update(json.dumps([p.slug, p.name, list(p.makes)]).encode())
        for logo in p.logos:
            h.update(_sha256_file(logo).encode())
    for photo in photos:
        h.update(f"{photo.image_id},{photo.make};".encode())
    return h.hexdigest()[:16]


@dataclass
class _Keypoints:
    """SIFT keypoints of every image the build looks at, concatenated."""

    xy: np.ndarray  # (n, 2) float32
    desc: np.ndarray  # (n, 128) uint8
    owner: np.ndarray  # (n,) int32 image index
    names: list[str]  # per image: exemplar name
    brand: np.ndarray  # per image: brand index, -1 for the other makes
    group: np.ndarray  # per image: brand index, or a distinct id per other make
    n_logos: int  # images [0, n_logos) are logo artwork


def _extract(plugins: dict[str, BrandPlugin], slugs: list[str], photos: Sequence[Photo]) -> _Keypoints:
    started = time.perf_counter()
    make_to_brand = {m: i for i, s in enumerate(slugs) for m in plugins[s].makes}
    other_makes: dict[str, int] = {}
    names: list[str] = []
    brand: list[int] = []
    group: list[int] = []
    xy_parts, desc_parts, owner_parts = [], [], []

    def add(name: str, brand_i: int, make: str, gray: np.ndarray) -> None:
        f = sift_features(gray)
        xy_parts.append(f.xy)
        desc_parts.append(f.descriptors.astype(np.uint8))  # OpenCV's SIFT values are whole numbers <= 255
        owner_parts.append(np.full(len(f.xy), len(names), np.int32))
        names.append(name)
        brand.append(brand_i)
        group.append(brand_i if brand_i >= 0 else len(slugs) + other_makes.setdefault(make, len(other_makes)))

    for i, slug in enumerate(slugs):
        for logo in plugins[slug].logos:
            add(f"logo:{slug}/{logo.name}", i, plugins[slug].makes[0], logo_gray(str(logo)))
    n_logos = len(names)
    for i, photo in enumerate(photos):
        gray = cv2.imread(str(photo.path), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise ValueError(f"cannot read train photo {photo.path}")
        add(f"photo:{photo.image_id}", make_to_brand.get(photo.make, -1), photo.make, gray)
        if i % 500 == 0:
            logger.info("sift %d/%d photos, %.0f s", i, len(photos), time.perf_counter() - started)
    return _Keypoints(np.concatenate(xy_parts), np.concatenate(desc_parts), np.concatenate(owner_parts),
                      names, np.array(brand, np.int32), np.array(group, np.int32), n_logos)


def _mine(kp: _Keypoints, params: GalleryParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every brand keypoint: (row, distance to nearest other-make descriptor, distinctiveness).

    One k-NN search of the brand keypoints among ALL train-photo keypoints
    (logos are queried but are never neighbours: they would vouch for themselves).
    """
    is_photo = kp.owner >= kp.n_logos
    photo_rows = np.flatnonzero(is_photo)
    index = flann_index(to_matching_space(kp.desc[photo_rows]))
    query = np.flatnonzero(kp.brand[kp.owner] >= 0)
    nn, sq = index.knnSearch(to_matching_space(kp.desc[query]), params.mining_neighbors,
                             params=dict(checks=params.mining_checks))
    del index  # ~1 GB for the full train set; free it before the next step
    dist = np.sqrt(np.maximum(sq, 0.0))
    nn = photo_rows[nn]
    group = kp.group[kp.owner]
    same_group = group[nn] == group[query][:, None]
    other_photo = kp.owner[nn] != kp.owner[query][:, None]
    # No other-make neighbour among k: the true one is at least as far as the k-th.
    d_neg = np.where(same_group, np.inf, dist).min(axis=1)
    d_neg = np.where(np.isinf(d_neg), dist[:, -1], d_neg)
    # Nearest keypoint of the same brand in ANOTHER photo: small when the
    # keypoint recurs across the brand's photos (emblem, grille, badge).
    d_same = np.where(same_group & other_photo, dist, np.inf).min(axis=1)
    distinct = d_neg / np.maximum(d_same, 1e-3)
    return query, d_neg.astype(np.float32), distinct


def _select(owner: np.ndarray, distinct: np.ndarray, n_logos: int, params: GalleryParams) -> np.ndarray:
    """Indices (into owner) of the most distinctive keypoints per exemplar; every logo keypoint."""
    order = np.lexsort((-distinct, owner))
    sorted_owner = owner[order]
    first = np.r_[0, np.flatnonzero(np.diff(sorted_owner)) + 1]
    rank = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
    is_logo = sorted_owner < n_logos
    keep = (rank < params.max_keypoints_per_exemplar) | is_logo
    counts = np.bincount(sorted_owner[keep], minlength=int(owner.max(initial=0)) + 1)
    keep &= (counts[sorted_owner] >= params.min_keypoints_per_exemplar) | is_logo
    return np.sort(order[keep])  # back to (exemplar, keypoint) order


def build_gallery(plugins: dict[str, BrandPlugin], photos: Sequence[Photo], params: GalleryParams) -> Gallery:
    """Mine brand exemplars from `photos` (TRAIN photos only: the caller's job) plus logo artwork.

    Every photo gives keypoints: plugin brands' photos become exemplars, the
    other makes' photos only tell which descriptors are NOT brand specific.
    """
    started = time.perf_counter()
    slugs = sorted(plugins)
    kp = _extract(plugins, slugs, photos)
    query, d_neg, distinct = _mine(kp, params)
    chosen = _select(kp.owner[query], distinct, kp.n_logos, params)
    rows = query[chosen]
    used_images, exemplar = np.unique(kp.owner[rows], return_inverse=True)
    info = {
        "params": asdict(params), "opencv": cv2.__version__, "train_photos": len(photos),
        "train_descriptors": int((kp.owner >= kp.n_logos).sum()), "descriptors": int(len(rows)),
        "exemplars": int(len(used_images)), "logo_exemplars": int((used_images < kp.n_logos).sum()),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    logger.info("gallery built: %s", info)
    return Gallery(
        descriptors=kp.desc[rows],
        xy=kp.xy[rows].astype(np.float32),
        neg_distance=d_neg[chosen],
        exemplar=exemplar.astype(np.int32),
        exemplar_brand=kp.brand[used_images],
        exemplar_names=np.array([kp.names[i] for i in used_images]),
        brand_slugs=np.array(slugs),
        brand_names=np.array([plugins[s].name for s in slugs]),
        fingerprint=fingerprint(plugins, photos, params),
        build_info=json.dumps(info),
    )


def train_photos(root: Path | None = None) -> list[Photo]:
    """The photos a gallery may learn from: the TRAIN split only, never val/test."""
    return [p for p in load_split(root) if p.split == "train"]


def cached_gallery(plugins: dict[str, BrandPlugin], photos: Sequence[Photo], cache_dir: Path | None = None,
                   params: GalleryParams = GalleryParams(), force: bool = False) -> tuple[Gallery, Path]:
    """The gallery for exactly these plugins, photos and parameters: loaded, or built and saved."""
    path = (cache_dir or default_cache_dir()) / f"gallery-{fingerprint(plugins, photos, params)}.npz"
    if path.is_file() and not force:
        try:
            return Gallery.load(path), path
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            logger.warning("cached gallery %s is unreadable (%s); rebuilding it", path, exc)
    logger.info("building logo gallery %s (no cached copy)", path)
    gallery = build_gallery(plugins, photos, params)
    gallery.save(path)
    return gallery, path


def load_or_build(plugins_dir: Path = DEFAULT_PLUGINS_DIR, data_root: Path | None = None,
                  cache_dir: Path | None = None, params: GalleryParams = GalleryParams(),
                  force: bool = False) -> Gallery:
    """The full gallery: every plugin, every TRAIN photo; built (minutes) when missing or stale."""
    data_root = data_root or data_dir()
    plugins = load_plugins(plugins_dir, data_root)
    return cached_gallery(plugins, train_photos(data_root), cache_dir, params, force)[0]


def write_index(gallery: Gallery, folder: Path) -> dict:
    """The service's FLANN index, built by the matcher it serves with, saved beside the gallery
    (the manifest's "index" entry)."""
    matcher = LogoMatcher(gallery)
    matcher.save_index(folder / INDEX_FILE)
    return {"file": INDEX_FILE, "fingerprint": gallery.fingerprint, "key": matcher.params.index_key(),
            "bytes": (folder / INDEX_FILE).stat().st_size}


def write_artifact(gallery: Gallery, folder: Path, command: str, calibration: Path = DEFAULT_CALIBRATION) -> Path:
    """The folder the service loads: gallery.npz plus manifest.json. Replaced whole, never half-written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gallery.save(folder / GALLERY_FILE)
    gate = {}
    if calibration.is_file():
        report = json.loads(calibration.read_text())
        gate = {"file": str(calibration.name), "min_inliers": report["gate"]["min_inliers"],
                "calibrated_on_gallery": report.get("gallery", {}).get("fingerprint"),
                "matches_this_gallery": report.get("gallery", {}).get("fingerprint") == gallery.fingerprint}
    manifest = {
        "format": ARTIFACT_FORMAT,
        "fingerprint": gallery.fingerprint,
        "brands": [{"slug": str(s), "name": str(n), "exemplars": e, "descriptors": d}
                   for s, n, (e, d) in zip(gallery.brand_slugs, gallery.brand_names, gallery.brand_counts())],
        "exemplars": int(len(gallery.exemplar_names)),
        "descriptors": int(len(gallery.descriptors)),
        "build": json.loads(gallery.build_info),
        "command": command,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
                   f"opencv {cv2.__version__}",
        "calibration": gate,
        "index": write_index(gallery, folder),
    }
    tmp = folder / f"{MANIFEST_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(folder / MANIFEST_FILE)
    load_artifact(folder)  # what the service will do: fail here, not at its start
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m builders.logo_gallery", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build", "info"])
    parser.add_argument("--out", type=Path, default=DEFAULT_ARTIFACT_DIR, help="artifact folder to write")
    parser.add_argument("--plugins-dir", type=Path, default=DEFAULT_PLUGINS_DIR)
    parser.add_argument("--data-dir", type=Path, default=None, help="shared data root ($CARRECOG_DATA_DIR)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="build cache ($CARRECOG_CACHE_DIR/logo_gallery)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached gallery exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.command == "info":
        gallery, manifest = load_artifact(args.out)
        print(json.dumps(manifest, indent=1))
        return
    cv2.setNumThreads(1)  # the machine is shared; one core is plenty
    gallery = load_or_build(args.plugins_dir, args.data_dir, args.cache_dir, force=args.force)
    command = "python -m builders.logo_gallery " + " ".join(argv if argv is not None else sys.argv[1:])
    current = args.out / MANIFEST_FILE
    manifest = json.loads(current.read_text()) if current.is_file() else {}
    index = saved_index(args.out, gallery, manifest)
    if manifest.get("fingerprint") == gallery.fingerprint and index and index.key == MatcherParams().index_key():
        print(f"{args.out} already holds gallery {gallery.fingerprint} and its index")
        return
    write_artifact(gallery, args.out, command)
    print(f"wrote {args.out}: gallery {gallery.fingerprint}, {len(gallery.exemplar_names)} exemplars, "
          f"{len(gallery.descriptors)} descriptors")
    for slug, (ex, d) in zip(gallery.brand_slugs, gallery.brand_counts()):
        print(f"{slug:12s} exemplars {ex:5d} descriptors {d:7d}")


if __name__ == "__main__":
    main()
