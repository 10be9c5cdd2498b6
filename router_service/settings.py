"""Router settings: environment variables with matching flags, read once at start."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from common.channels import DownstreamSettings, add_downstream_arguments
from common.data import data_dir
from common.images import DEFAULT_MAX_PIXELS
from common.plugins import DEFAULT_PLUGINS_DIR
from common.server import DEFAULT_PORTS, ServerSettings, add_server_arguments, env
from router_service.open_set import OpenSetPolicy


# The stack routes to the EfficientNet-Lite0 model by default: it is far more
# accurate than the ResNet50s trained from scratch (docs/models.md). The
# ResNet50s stay served and can be forced by name for comparison.
DEFAULT_GLOBAL_MODEL = "efficientnet_lite0"
# When the logo stage runs (docs/logo.md, "Logo policy"); the threshold of `uncertain` is calibrated
# on val by builders/logo_policy.py into logo_policy.json.
ALWAYS, UNCERTAIN = "always", "uncertain"
LOGO_POLICIES = {
    ALWAYS: "every photo goes through the logo stage, concurrently with the global model",
    UNCERTAIN: "the logo stage runs only when the global model's make confidence is below a threshold",
}
DEFAULT_LOGO_POLICY = UNCERTAIN
DEFAULT_LOGO_POLICY_FILE = Path(__file__).resolve().parent / "logo_policy.json"
DEFAULT_MODEL_CARDS_DIR = Path(__file__).resolve().parent.parent / "serving_models"
# The localiser finds the car in a whole photo before classification (router_service/localizer.py).
DEFAULT_LOCALIZER_MODEL = "localizer"
DEFAULT_CROP_MARGIN = 0.05
DEFAULT_WHOLE_PHOTO_SHARE = 0.9
# The open-set verdict's thresholds (router_service/open_set.py), fitted by builders/open_set.py.
DEFAULT_OPEN_SET_FILE = Path(__file__).resolve().parent / "open_set.json"
# Recognitions working downstream at once (router_service/admission.py): the model server's
# throughput is flat beyond this many (docs/operations.md, "Admission").
DEFAULT_MAX_ACTIVE = 8
# An environment variable set to "" means "unset" (common.server.env): this word turns a stage off.
NONE = "none"
DEFAULT_EXTRA_MODELS = "global,global:audi,global:bmw,global:chevrolet,global:dodge,global:ford,global:hyundai"


@dataclass(frozen=True)
class RouterSettings:
    server: ServerSettings
    model_server: DownstreamSettings
    logo_service: DownstreamSettings  # address "" = no logo stage
    global_model: str
    localizer_model: str  # "" = no localisation: photos are classified whole
    localize_timeout_s: float
    crop_margin: float
    whole_photo_share: float
    extra_models: tuple[str, ...]
    plugins_dir: Path
    data_dir: Path
    logo_timeout_s: float
    predict_timeout_s: float
    max_image_mb: float
    max_image_pixels: int
    breaker_failures: int
    breaker_reset_s: float
    logo_policy: str
    uncertain_below: float
    uncertain_source: str  # where uncertain_below came from, for the start-up log
    open_set: OpenSetPolicy | None  # None: answers carry no verdict
    model_cards_dir: Path | None
    health_interval_s: float
    batch_limit: int
    max_active: int
    log_level: str


def parse_settings(argv: list[str] | None = None) -> RouterSettings:
    parser = argparse.ArgumentParser(prog="python -m router_service", description=__doc__)
    add_server_arguments(parser, "ROUTER", default_port=DEFAULT_PORTS["ROUTER"])
    add_downstream_arguments(parser, "model-server", "MODEL_SERVER", "TF Serving gRPC address host:port, required")
    add_downstream_arguments(parser, "logo-service", "LOGO_SERVICE", "logo service host:port; empty = no logo stage",
                             default="")
    parser.add_argument("--global-model", default=env("ROUTER_GLOBAL_MODEL", DEFAULT_GLOBAL_MODEL),
                        help="TF Serving model name of the global classifier ($ROUTER_GLOBAL_MODEL)")
    parser.add_argument("--localizer-model", default=env("ROUTER_LOCALIZER_MODEL", DEFAULT_LOCALIZER_MODEL),
                        help="TF Serving model name of the localiser that finds the car before classification; "
                             "`none` (or an empty flag) = classify every photo whole ($ROUTER_LOCALIZER_MODEL)")
    parser.add_argument("--localize-timeout-ms", type=float, default=float(env("ROUTER_LOCALIZE_TIMEOUT_MS", "3000")),
                        help="deadline for the localiser; slower → the whole photo is classified "
                             "($ROUTER_LOCALIZE_TIMEOUT_MS)")
    parser.add_argument("--crop-margin", type=float, default=float(env("ROUTER_CROP_MARGIN", str(DEFAULT_CROP_MARGIN))),
                        help="the car's box grows by this share of its width and height on every side before "
                             "the crop ($ROUTER_CROP_MARGIN)")
    parser.add_argument("--whole-photo-share", type=float, default=float(env("ROUTER_WHOLE_PHOTO_SHARE", str(DEFAULT_WHOLE_PHOTO_SHARE))),
                        help="a box (with its margin) spanning at least this share of the photo's width and height "
                             "is not cropped: the photo is already a tight crop ($ROUTER_WHOLE_PHOTO_SHARE)")
    parser.add_argument("--extra-models", default=env("ROUTER_EXTRA_MODELS", DEFAULT_EXTRA_MODELS),
                        help="comma-separated name[:signature] of further served models that clients may pick "
                             "with force_model, e.g. to compare them; empty = none ($ROUTER_EXTRA_MODELS)")
    parser.add_argument("--plugins-dir", type=Path, default=Path(env("CARRECOG_PLUGINS_DIR", str(DEFAULT_PLUGINS_DIR))),
                        help="brand plugin folders ($CARRECOG_PLUGINS_DIR)")
    parser.add_argument("--data-dir", type=Path, default=data_dir(), help="shared data root ($CARRECOG_DATA_DIR)")
    parser.add_argument("--logo-timeout-ms", type=float, default=float(env("ROUTER_LOGO_TIMEOUT_MS", "1500")),
                        help="deadline for the logo stage; slower → global model ($ROUTER_LOGO_TIMEOUT_MS)")
    parser.add_argument("--predict-timeout-ms", type=float, default=float(env("ROUTER_PREDICT_TIMEOUT_MS", "15000")),
                        help="deadline for one Predict call ($ROUTER_PREDICT_TIMEOUT_MS)")
    parser.add_argument("--max-image-mb", type=float, default=float(env("ROUTER_MAX_IMAGE_MB", "20")),
                        help="largest accepted image file ($ROUTER_MAX_IMAGE_MB)")
    parser.add_argument("--max-image-pixels", type=int,
                        default=int(env("ROUTER_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))),
                        help="largest accepted width x height, read from the header before decoding "
                             "($ROUTER_MAX_IMAGE_PIXELS)")
    parser.add_argument("--logo-breaker-failures", type=int, default=int(env("ROUTER_LOGO_BREAKER_FAILURES", "3")),
                        help="logo calls failed in a row that open the circuit breaker ($ROUTER_LOGO_BREAKER_FAILURES)")
    parser.add_argument("--logo-breaker-reset-ms", type=float,
                        default=float(env("ROUTER_LOGO_BREAKER_RESET_MS", "5000")),
                        help="how long an open breaker skips the logo stage before one probe call "
                             "($ROUTER_LOGO_BREAKER_RESET_MS)")
    parser.add_argument("--logo-policy", choices=sorted(LOGO_POLICIES), default=env("ROUTER_LOGO_POLICY", DEFAULT_LOGO_POLICY),
                        help="when the logo stage runs: " + "; ".join(f"{k}: {v}" for k, v in LOGO_POLICIES.items())
                             + " ($ROUTER_LOGO_POLICY)")
    parser.add_argument("--logo-uncertain-below", type=float, default=env("ROUTER_LOGO_UNCERTAIN_BELOW"),
                        help="uncertain policy: run the logo stage below this make confidence; default: the "
                             "calibrated one in --logo-policy-file ($ROUTER_LOGO_UNCERTAIN_BELOW)")
    parser.add_argument("--logo-policy-file", type=Path,
                        default=Path(env("ROUTER_LOGO_POLICY_FILE", str(DEFAULT_LOGO_POLICY_FILE))),
                        help="logo_policy.json with the calibrated threshold ($ROUTER_LOGO_POLICY_FILE)")
    parser.add_argument("--open-set-file", default=env("ROUTER_OPEN_SET_FILE", str(DEFAULT_OPEN_SET_FILE)),
                        help="open_set.json with the fitted verdict thresholds (router_service/open_set.py); "
                             "`none` (or an empty flag) = no verdict ($ROUTER_OPEN_SET_FILE)")
    parser.add_argument("--model-cards-dir", default=env("ROUTER_MODEL_CARDS_DIR", str(DEFAULT_MODEL_CARDS_DIR)),
                        help="TF Serving's model base folder, read for <model>/<version>/model_card.json (what "
                             "ListModels says about each model); empty = none ($ROUTER_MODEL_CARDS_DIR)")
    parser.add_argument("--health-interval-s", type=float, default=float(env("ROUTER_HEALTH_INTERVAL_S", "5")),
                        help="how often downstream health is re-checked ($ROUTER_HEALTH_INTERVAL_S)")
    parser.add_argument("--batch-limit", type=int, default=int(env("ROUTER_BATCH_LIMIT", "64")),
                        help="most images in one RecognizeBatch call ($ROUTER_BATCH_LIMIT)")
    parser.add_argument("--max-active", type=int, default=int(env("ROUTER_MAX_ACTIVE", str(DEFAULT_MAX_ACTIVE))),
                        help="recognitions working downstream at once; the others queue, and one that cannot be "
                             "answered within its deadline is refused with RESOURCE_EXHAUSTED; 0 = no gate "
                             "($ROUTER_MAX_ACTIVE)")
    args = parser.parse_args(argv)
    if args.logo_uncertain_below is not None:
        uncertain_below, uncertain_source = float(args.logo_uncertain_below), "ROUTER_LOGO_UNCERTAIN_BELOW"
    else:
        try:
            uncertain_below = float(json.loads(args.logo_policy_file.read_text())["uncertain_below"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"{args.logo_policy_file}: no calibrated threshold ({exc}); run "
                         "`python -m builders.logo_policy` or set ROUTER_LOGO_UNCERTAIN_BELOW")
        uncertain_source = str(args.logo_policy_file)
    open_set = None
    if args.open_set_file.strip() not in ("", NONE):
        try:
            open_set = OpenSetPolicy.load(Path(args.open_set_file))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"{args.open_set_file}: no fitted verdict thresholds ({exc}); run "
                         "`python -m builders.open_set` or set ROUTER_OPEN_SET_FILE=none for no verdict")
    if not args.model_server:
        parser.error("the model server address is required: --model-server or MODEL_SERVER_ADDRESS")
    return RouterSettings(
        server=ServerSettings.from_args(args),
        model_server=DownstreamSettings.from_args(args, "model_server"),
        logo_service=DownstreamSettings.from_args(args, "logo_service"),
        global_model=args.global_model,
        localizer_model="" if args.localizer_model.strip() == NONE else args.localizer_model.strip(),
        localize_timeout_s=args.localize_timeout_ms / 1000,
        crop_margin=args.crop_margin,
        whole_photo_share=args.whole_photo_share,
        extra_models=tuple(m.strip() for m in args.extra_models.split(",") if m.strip()),
        plugins_dir=args.plugins_dir,
        data_dir=args.data_dir,
        logo_timeout_s=args.logo_timeout_ms / 1000,
        predict_timeout_s=args.predict_timeout_ms / 1000,
        max_image_mb=args.max_image_mb,
        max_image_pixels=args.max_image_pixels,
        breaker_failures=args.logo_breaker_failures,
        breaker_reset_s=args.logo_breaker_reset_ms / 1000,
        logo_policy=args.logo_policy,
        uncertain_below=uncertain_below,
        uncertain_source=uncertain_source,
        open_set=open_set,
        model_cards_dir=Path(args.model_cards_dir) if args.model_cards_dir else None,
        health_interval_s=args.health_interval_s,
        batch_limit=args.batch_limit,
        max_active=args.max_active,
        log_level=args.log_level,
    )
