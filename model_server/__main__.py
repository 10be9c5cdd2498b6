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

import os
from typing import Sequence

from common.runner import run_service
from model_server.server import serve
from model_server.settings import ModelServerSettings, build_parser


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
