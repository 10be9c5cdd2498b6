"""The model server: check the config, load every model, serve TF Serving's gRPC API until SIGTERM."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from google.protobuf import text_format

from common.logs import log_event
from common.server import GrpcServer
from model_server.batching import read_batching_parameters
from model_server.config import load_model_server_config, parse_prefix_map, plan_models, single_model_config
from model_server.settings import ModelServerSettings

logger = logging.getLogger("carrecog.model_server")


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
