"""python -m logo_service: serve carrecog.v1.LogoService (flags and env vars: --help)."""
from __future__ import annotations

import argparse

from common.runner import run_service
from logo_service.server import serve
from logo_service.settings import add_arguments, settings_from_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m logo_service",
                                     description="Serve carrecog.v1.LogoService (SIFT logo gate).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    # Settings are read inside run_service, so a bad setting is one clear log line and exit 1.
    run_service("logo", lambda: serve(settings_from_args(args)), args.log_level)


if __name__ == "__main__":
    main()
