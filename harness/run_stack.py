"""`make run`: start model server, logo service and router; recognise IMAGES; keep serving until Ctrl-C.

A service that dies is restarted on its port while the others keep serving
(harness/supervisor.py).

    python -m harness.run_stack [IMAGE_OR_FOLDER ...]

Ports come from MODEL_SERVER_PORT (8500), LOGO_PORT (50051) and ROUTER_PORT
(50050). With no images given it recognises a few shared Stanford Cars photos.
"""
from __future__ import annotations

import signal
import sys
import time

from client.__main__ import main as client_main
from harness.stack import ROOT, start_logo_service, start_model_server, start_router
from harness.supervisor import Supervisor
from common.data import data_dir
from common.server import port_from_env

# Test-split photos: three whose logo the gate recognises when the logo stage runs (audi,
# chevrolet, dodge), three it does not. With the default logo policy (uncertain) the model
# is sure of all six makes, so each answer says the logo stage was skipped and why.
DEFAULT_IMAGE_IDS = ["00274", "01752", "03205", "00001", "00013", "00160"]


def default_images() -> list[str]:
    folder = data_dir() / "stanford_cars" / "images"
    return [str(folder / f"{i}.jpg") for i in DEFAULT_IMAGE_IDS if (folder / f"{i}.jpg").exists()]


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so `finally` below stops the services on SIGTERM as on Ctrl-C


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    images = argv or default_images()
    log_dir = ROOT / "runs" / "stack"
    supervisor = Supervisor()
    try:
        print(f"starting services (logs in {log_dir}) ...", file=sys.stderr)
        model_server = supervisor.add(lambda p: start_model_server(log_dir, p), port_from_env("MODEL_SERVER"))
        logo = supervisor.add(lambda p: start_logo_service(log_dir, p), port_from_env("LOGO"))
        router = supervisor.add(lambda p: start_router(model_server.address, logo.address, log_dir, p),
                                port_from_env("ROUTER"))
        for service in supervisor.services:
            service.wait_healthy()
            print(f"{service.name}: SERVING on {service.address} (pid {service.process.pid})", file=sys.stderr)
        if images:
            client_main(["--address", router.address, *images])
        else:
            print("no images given and ../shared/data is not there: pass IMAGES=...", file=sys.stderr)
        print(f"the stack keeps running (router on {router.address}); Ctrl-C stops it", file=sys.stderr)
        while True:
            supervisor.check()
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    finally:
        supervisor.stop_all(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
