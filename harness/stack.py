"""Start the three services as real processes and wait until they are healthy.

Used by `make run` (harness/run_stack.py) and by the integration tests, so
both exercise the same command lines and environment variables.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import contextlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import grpc
from google.protobuf import text_format

from common import healthcheck
from model_server.config import load_model_server_config, only_models

ROOT = Path(__file__).resolve().parent.parent
SERVING_MODELS = ROOT / "serving_models"


class LoggedProcess:
    """A child process that writes to `log_path`: its log's tail, and a stop that ends in SIGKILL."""

    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_mb(self) -> float:
        """Resident memory now (/proc); 0.0 once the process is gone."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
        return 0.0

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class ServiceProcess(LoggedProcess):
    """One running service: its process, bound port, log file and Prometheus /metrics port (None: off)."""

    name: str
    process: subprocess.Popen
    port: int
    log_path: Path
    metrics_port: int | None = None
    address: str = field(init=False)

    def __post_init__(self) -> None:
        self.address = f"127.0.0.1:{self.port}"

    def health(self, service: str = "", credentials: grpc.ChannelCredentials | None = None,
               server_name: str | None = None) -> str:
        """The grpc.health.v1 status name, or the error code's name when it cannot answer."""
        return healthcheck.status(self.address, service, credentials, server_name, timeout=2)

    def wait_healthy(self, timeout: float = 180.0, **kwargs) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.health(**kwargs) == "SERVING":
                return
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not SERVING after {timeout:.0f}s:\n{self.log_tail()}")



def free_port() -> int:
    """A TCP port nothing listens on right now (for a service that must come back on the same one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_file(path: Path, process: subprocess.Popen, name: str, log_path: Path, timeout: float) -> None:
    """Wait until a starting process has written `path` (its bound port or address); fail with its log's
    tail if it exits first, kill it if it takes longer than `timeout`."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"{name} did not write {path.name} in {timeout:.0f}s")
        time.sleep(0.1)


def start_service(name: str, module: str, args: list[str], env: dict[str, str] | None = None,
                  log_dir: Path | None = None, port: int = 0, wait_for_port: float = 180.0) -> ServiceProcess:
    """Run `python -m module args --port PORT --port-file F`; returns once the port is bound.

    Port 0 (tests) also takes any free metrics port; a fixed port (make run) keeps the
    service's default metrics port ($<PREFIX>_METRICS_PORT). The service writes its metrics
    port to F.metrics before F."""
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="carrecog-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / f"{name}.port"
    metrics_file = Path(f"{port_file}.metrics")
    port_file.unlink(missing_ok=True)
    metrics_file.unlink(missing_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--reflection", "--port", str(port), "--port-file", str(port_file),
             *(["--metrics-port", "0"] if port == 0 else [])],
            cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
    wait_for_file(port_file, process, name, log_path, wait_for_port)
    metrics_port = int(metrics_file.read_text()) if metrics_file.exists() else None
    return ServiceProcess(name, process, int(port_file.read_text()), log_path, metrics_port)


# Each merged batch runs its ops on one core, and batching_parameters.txt runs num_batch_threads (= the
# cores) batches at once: 1.23-1.26x the router's throughput at 8 clients and 0.88-0.92x its p50 at 1 client
# against TF's own thread choice, in two runs of `python -m scripts.bench_serving_settings`
# (docs/operations.md). docker-compose.yml and deploy/k8s/tfserving.yaml pass the same flag to TF Serving.
INTRA_OP_THREADS = 1


def start_model_server(log_dir: Path | None = None, port: int = 0, models: Path = SERVING_MODELS,
                       env: dict[str, str] | None = None, only: Sequence[str] = (),
                       batching_parameters: Path | None = None, intra_op_threads: int = INTRA_OP_THREADS,
                       inter_op_threads: int = 0) -> ServiceProcess:
    """`only`: serve just these models of models.config (a test that restarts the model server and needs
    the default model only need not wait for the others to load). `batching_parameters` (default: the
    models' own file) and the thread counts (0 = TF's choice) are for measuring other settings."""
    config = models / "models.config"
    if only:
        config = subset_config(config, only, Path(log_dir or tempfile.mkdtemp(prefix="carrecog-")))
    return start_service("model_server", "model_server", [
        "--model_config_file", str(config),
        "--model_base_path_prefix_map", f"/models={models}",
        "--enable_batching", "--batching_parameters_file", str(batching_parameters or models / "batching_parameters.txt"),
        "--tensorflow_intra_op_parallelism", str(intra_op_threads),
        "--tensorflow_inter_op_parallelism", str(inter_op_threads),
    ], env=env, log_dir=log_dir, port=port)


def subset_config(config: Path, names: Sequence[str], out_dir: Path) -> Path:
    """A copy of the text-format ModelServerConfig `config` keeping only the models `names`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"models-{'-'.join(names)}.config"
    path.write_text(text_format.MessageToString(only_models(load_model_server_config(config), names)))
    return path


def start_logo_service(log_dir: Path | None = None, port: int = 0, env: dict[str, str] | None = None) -> ServiceProcess:
    return start_service("logo_service", "logo_service", [], env=env, log_dir=log_dir, port=port)


def start_router(model_server: str, logo_service: str, log_dir: Path | None = None, port: int = 0,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None) -> ServiceProcess:
    return start_service("router", "router_service", [
        "--model-server", model_server, "--logo-service", logo_service, *(extra_args or [])],
        env=env, log_dir=log_dir, port=port)


@contextlib.contextmanager
def running_stack(prefix: str, router_args: list[str] | None = None) -> Iterator[str]:
    """The whole stack (model server, logo service, router) on ephemeral ports, logs in a fresh temporary
    folder; yields the router's address and stops everything on the way out."""
    logs = Path(tempfile.mkdtemp(prefix=prefix))
    services = [start_model_server(logs), start_logo_service(logs)]
    try:
        for service in services:
            service.wait_healthy()
        services.append(start_router(services[0].address, services[1].address, logs, extra_args=router_args))
        services[-1].wait_healthy()
        yield services[-1].address
    finally:
        for service in reversed(services):
            service.stop()


@contextlib.contextmanager
def router_or_stack(router: str | None, prefix: str, router_args: list[str] | None = None) -> Iterator[str]:
    """The router at `router` when given (host:port), else a fresh stack's (running_stack)."""
    if router:
        yield router
    else:
        with running_stack(prefix, router_args) as address:
            yield address


def write_report(out: Path, report: dict, markdown: str) -> None:
    """`out` (JSON) and the same name with .md beside it; the markdown also to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
