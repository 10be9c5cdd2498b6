"""The logo gallery the service matches against, loaded from its artifact.

The gallery is built offline (`make gallery`, builders/logo_gallery.py) from
the TRAIN photos and the plugins' logo artwork, into an artifact folder:

    gallery.npz     the arrays below, plain .npz (no pickle)
    manifest.json   fingerprint, brands with their exemplar and descriptor
                    counts, the build command, when and where it was built,
                    and the gate it was calibrated with
    flann_index.bin the matcher's FLANN index over those descriptors, saved so that a
                    starting service loads it in 0.4 s instead of building it in 4 s
                    (optional: without it, or built with other parameters, it is built)

The service loads only that: it needs neither the training photos nor the
code that mined them. What is stored per gallery keypoint: its SIFT descriptor
(uint8, lossless for OpenCV's SIFT), its xy in the exemplar image, its
exemplar, and `neg_distance`, the distance to the nearest descriptor from a
train photo of ANOTHER make (see logo_service/matcher.py for how it is used).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ARTIFACT_FORMAT = 1
GALLERY_FILE, MANIFEST_FILE, INDEX_FILE = "gallery.npz", "manifest.json", "flann_index.bin"
DEFAULT_ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "artifacts" / "logo_gallery"


class MissingArtifact(RuntimeError):
    """No usable gallery artifact where the service was told to look."""


@dataclass
class Gallery:
    descriptors: np.ndarray  # (n, 128) uint8
    xy: np.ndarray  # (n, 2) float32, pixels of the exemplar image
    neg_distance: np.ndarray  # (n,) float32, to the nearest other-make train descriptor
    exemplar: np.ndarray  # (n,) int32 index into exemplar_names
    exemplar_brand: np.ndarray  # (e,) int32 index into brand_slugs
    exemplar_names: np.ndarray  # (e,) str, "photo:<image_id>" or "logo:<file>"
    brand_slugs: np.ndarray  # (b,) str
    brand_names: np.ndarray  # (b,) str
    fingerprint: str
    build_info: str  # JSON: parameters, counts, build seconds

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # two builders never share a temp file
        np.savez(tmp, **{k: np.asarray(v) for k, v in asdict(self).items()})
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file

    @classmethod
    def load(cls, path: Path) -> "Gallery":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["fingerprint"] = str(arrays["fingerprint"])
        arrays["build_info"] = str(arrays["build_info"])
        return cls(**arrays)

    def brand_counts(self) -> list[tuple[int, int]]:
        """(exemplars, descriptors) per brand, in brand_slugs order."""
        per_desc = np.bincount(self.exemplar_brand[self.exemplar], minlength=len(self.brand_slugs))
        per_ex = np.bincount(self.exemplar_brand, minlength=len(self.brand_slugs))
        return [(int(e), int(d)) for e, d in zip(per_ex, per_desc)]


def load_artifact(folder: Path) -> tuple[Gallery, dict]:
    """(gallery, manifest) from an artifact folder; MissingArtifact says what to run when it is absent or broken."""
    manifest_path, gallery_path = Path(folder) / MANIFEST_FILE, Path(folder) / GALLERY_FILE
    if not manifest_path.is_file() or not gallery_path.is_file():
        raise MissingArtifact(f"no logo gallery artifact in {folder} (it needs {MANIFEST_FILE} and {GALLERY_FILE}): "
                              "build it with `make gallery`, or point LOGO_GALLERY_DIR at one")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise MissingArtifact(f"{manifest_path}: artifact format {manifest.get('format')!r}, this service reads "
                              f"{ARTIFACT_FORMAT}; rebuild it with `make gallery`")
    gallery = Gallery.load(gallery_path)
    if gallery.fingerprint != manifest.get("fingerprint"):
        raise MissingArtifact(f"{folder}: {GALLERY_FILE} has fingerprint {gallery.fingerprint}, the manifest says "
                              f"{manifest.get('fingerprint')}; rebuild it with `make gallery`")
    return gallery, manifest


@dataclass(frozen=True)
class SavedIndex:
    """A FLANN index saved beside the gallery, and what it was built with (MatcherParams.index_key)."""
    path: Path
    key: dict


def saved_index(folder: Path, gallery: Gallery, manifest: dict) -> SavedIndex | None:
    """The artifact's saved index, when it has one built over this gallery."""
    entry = manifest.get("index") or {}
    path = Path(folder) / entry.get("file", INDEX_FILE)
    if entry.get("fingerprint") != gallery.fingerprint or not path.is_file():
        return None
    return SavedIndex(path, entry.get("key") or {})
