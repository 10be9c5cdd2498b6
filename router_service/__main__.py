"""python -m router_service: the recognition gRPC service."""
from common.runner import run_service
from router_service.settings import parse_settings


def main() -> None:
    settings = parse_settings()

    def start():
        from router_service.server import serve  # TensorFlow: imported once logs are JSON lines

        return serve(settings)

    run_service("router", start, settings.log_level)


if __name__ == "__main__":
    main()
