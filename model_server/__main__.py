"""Entry point: `python -m model_server`, with TF Serving's own flag names.

    python -m model_server --model_config_file serving_models/models.config \\
        --model_base_path_prefix_map /models=serving_models --port 8500

accepts the command line of `tensorflow_model_server` in docker-compose.yml
(--port, --rest_api_port, --model_config_file, --enable_batching,
--batching_parameters_file, --model_name/--model_base_path, ...) plus the
shared server flags of common/server.py (--port-file, --reflection, TLS, ...).
Every flag also reads an environment variable MODEL_SERVER_<FLAG NAME>.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from google.protobuf import text_format

from common.images import DEFAULT_MAX_PIXELS
from common.logs import log_event
from common.runner import run_service
from common.server import DEFAULT_PORTS, GrpcServer, ServerSettings, add_server_arguments, env
from model_server.batching import read_batching_parameters
from model_server.config import load_model_server_config, parse_prefix_map, plan_models, single_model_config

logger = logging.getLogger("carrecog.model_server")
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


async def serve(settings: ModelServerSettings) -> None:
    """Check the config, bind (health NOT_SERVING), load every model, then SERVING until SIGTERM."""
    config = (load_model_server_config(settings.model_config_file) if settings.model_config_file
              else single_model_config(settings.model_name, settings.model_base_path or ""))
    plans = plan_models(config, parse_prefix_map(settings.prefix_map),
                        settings.allow_version_labels_for_unavailable_models)
    batching = read_batching_parameters(settings.enable_batching, settings.batching_parameters_file)
    if batching is not None:
        log_event(logger, "batching enabled", parameters=text_format.MessageToString(batching, as_one_line=True))
    if settings.rest_api_port:
        log_event(logger, "rest_api_port ignored: this stand-in serves gRPC only", logging.WARNING,
                  rest_api_port=settings.rest_api_port)

    # TensorFlow is slow to import: only once the configuration is known to be good.
    import tensorflow as tf

    from model_server.batch_scheduler import BatchScheduler
    from model_server.repository import ModelRepository
    from model_server.servicer import MODEL_SERVICE, PREDICTION_SERVICE, UNLIMITED_METHODS, add_servicers
    from model_server.warmup import run_warmup

    tf.config.threading.set_intra_op_parallelism_threads(settings.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(settings.inter_op_threads)
    def warmup(servable, path):
        return run_warmup(servable, path, settings.max_image_pixels)

    repository = ModelRepository(plans, settings.saved_model_tags,
                                 warmup if settings.enable_model_warmup else None)
    # One thread per in-flight call, like TF Serving's synchronous gRPC server.
    executor = ThreadPoolExecutor(max_workers=settings.server.max_concurrent_rpcs, thread_name_prefix="tf")
    server = GrpcServer("model_server", settings.server, [PREDICTION_SERVICE, MODEL_SERVICE],
                        unlimited_methods=UNLIMITED_METHODS)
    add_servicers(server.server, repository, executor, BatchScheduler(batching) if batching is not None else None,
                  settings.max_image_pixels)
    await server.start()
    try:
        await asyncio.get_running_loop().run_in_executor(executor, repository.load_all)
    except BaseException:
        await server.server.stop(0)
        raise
    await server.set_serving(True)
    log_event(logger, "serving", models=repository.model_names)
    try:
        await server.wait_for_shutdown()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model_config_file and not args.model_base_path:
        parser.error("one of --model_config_file or --model_base_path is required")
    settings = ModelServerSettings.from_args(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ INFO/WARNING lines are not JSON log lines
    run_service("model_server", lambda: serve(settings), args.log_level)


if __name__ == "__main__":
    main()
