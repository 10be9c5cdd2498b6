"""Logo service settings: environment variables with matching flags, read once at start."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

from common.images import DEFAULT_MAX_BYTES
from common.server import DEFAULT_PORTS, ServerSettings, add_server_arguments, env
from logo_service.gallery import DEFAULT_ARTIFACT_DIR

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "calibration.json"
DEFAULT_CANDIDATES = 5


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
