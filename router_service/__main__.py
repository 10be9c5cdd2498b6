"""python -m router_service: the recognition gRPC service."""
from common.runner import run_service
from router_service.server import serve
from router_service.settings import parse_settings

if __name__ == "__main__":
    settings = parse_settings()
    run_service("router", lambda: serve(settings), settings.log_level)
