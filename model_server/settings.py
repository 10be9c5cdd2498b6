"""Model server settings: TF Serving's flag names, each also read as MODEL_SERVER_<FLAG NAME>, read once."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from common.images import DEFAULT_MAX_PIXELS
from common.server import DEFAULT_PORTS, ServerSettings, add_server_arguments, env

PREFIX = "MODEL_SERVER"


def parse_bool(value: str) -> bool:
    """TF flag booleans: --flag, --flag=true, --flag=false (also 1/0)."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _env_flag(name: str, default: str | None = None) -> str | None:
    return env(f"{PREFIX}_{name.upper()}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_server",
        description="A stand-in for TensorFlow Serving's gRPC API (PredictionService.Predict/GetModelMetadata, "
                    "ModelService.GetModelStatus) over the same models.config and SavedModel tree.")
    add_server_arguments(parser, prefix=PREFIX, default_port=DEFAULT_PORTS[PREFIX])

    def flag(name: str, help: str, type=str, default: str | None = None, boolean: bool = False) -> None:
        value = _env_flag(name, default)
        help = f"{help} (${PREFIX}_{name.upper()})"
        if boolean:
            parser.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True,
                                default=parse_bool(value) if value else False, help=help)
        else:
            parser.add_argument(f"--{name}", type=type, default=type(value) if value is not None else None,
                                help=help)

    flag("model_config_file", "text-format ModelServerConfig listing the models to serve "
         "(--model_name/--model_base_path are then ignored)")
    flag("model_name", "name of the single model to serve without a config file", default="default")
    flag("model_base_path", "base path of that single model (the folder holding the version folders)")
    parser.add_argument("--model_base_path_prefix_map", action="append",
                        help="PREFIX=LOCAL_DIR: rewrite base paths starting with PREFIX (e.g. the container's "
                             "/models) to LOCAL_DIR; repeat or comma-separate for several (not a TF Serving flag) "
                             f"(${PREFIX}_MODEL_BASE_PATH_PREFIX_MAP)")
    flag("enable_batching", "merge concurrent Predict calls on one signature into batches", boolean=True)
    flag("batching_parameters_file", "text-format BatchingParameters (needs --enable_batching)")
    flag("allow_version_labels_for_unavailable_models",
         "allow version_labels in the config at start-up (TF Serving rejects them otherwise)", boolean=True)
    flag("enable_model_warmup", "replay each version's assets.extra/tf_serving_warmup_requests before it is "
         "AVAILABLE", boolean=True, default="true")
    flag("saved_model_tags", "comma-separated MetaGraphDef tags to load", default="serve")
    flag("tensorflow_intra_op_parallelism", "TF intra-op threads (0 = TF's choice)", type=int, default="0")
    flag("tensorflow_inter_op_parallelism", "TF inter-op threads (0 = TF's choice)", type=int, default="0")
    flag("max_image_pixels", "refuse encoded JPEG/PNG inputs whose header claims more pixels, before decoding "
         "(0 = no limit; not a TF Serving flag: its SavedModels carry the check in-graph)", type=int,
         default=str(DEFAULT_MAX_PIXELS))
    flag("rest_api_port", "accepted for command-line compatibility; this stand-in serves gRPC only",
         type=int, default="0")
    flag("file_system_poll_wait_seconds", "accepted; versions are found once at start (restart to pick up "
         "a new version)", type=int, default="1")
    flag("model_config_file_poll_wait_seconds", "accepted; the config is read once at start", type=int,
         default="0")
    return parser


@dataclass(frozen=True)
class ModelServerSettings:
    """Everything the model server reads at start, once."""

    server: ServerSettings
    model_config_file: str | None
    model_name: str
    model_base_path: str | None
    prefix_map: tuple[str, ...]
    enable_batching: bool
    batching_parameters_file: str | None
    allow_version_labels_for_unavailable_models: bool
    saved_model_tags: tuple[str, ...]
    enable_model_warmup: bool
    intra_op_threads: int
    inter_op_threads: int
    rest_api_port: int
    max_image_pixels: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelServerSettings":
        return cls(
            server=ServerSettings.from_args(args),
            model_config_file=args.model_config_file,
            model_name=args.model_name,
            model_base_path=args.model_base_path,
            prefix_map=tuple(args.model_base_path_prefix_map
                             or filter(None, [_env_flag("model_base_path_prefix_map")])),
            enable_batching=args.enable_batching,
            batching_parameters_file=args.batching_parameters_file,
            allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
            saved_model_tags=tuple(t for t in args.saved_model_tags.split(",") if t),
            enable_model_warmup=args.enable_model_warmup,
            intra_op_threads=args.tensorflow_intra_op_parallelism,
            inter_op_threads=args.tensorflow_inter_op_parallelism,
            rest_api_port=args.rest_api_port,
            max_image_pixels=args.max_image_pixels,
        )
