"""Keep the services of `make run` running: one that exits is started again, the others keep serving.

A down logo service only degrades answers (the router falls back to the
global model and says why) and a down model server makes the router
NOT_SERVING until it is back; neither is a reason to stop the rest. So the
supervisor restarts a dead service on the same port (its clients reconnect to
the address they know), waiting longer between restarts when it keeps dying.
"""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable

from harness.stack import ServiceProcess

Starter = Callable[[int], ServiceProcess]  # port -> a started service


@dataclass
class Supervised:
    service: ServiceProcess
    start: Starter
    restarts: int = 0
    next_start_at: float = 0.0  # not before this monotonic time (backoff)


class Supervisor:
    def __init__(self, min_backoff_s: float = 1.0, max_backoff_s: float = 30.0, log=sys.stderr) -> None:
        self.entries: dict[str, Supervised] = {}
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.log = log

    def add(self, start: Starter, port: int = 0) -> ServiceProcess:
        service = start(port)
        self.entries[service.name] = Supervised(service, start)
        return service

    @property
    def services(self) -> list[ServiceProcess]:
        return [entry.service for entry in self.entries.values()]

    def check(self) -> list[str]:
        """Restart every service that has exited (when its backoff allows); returns their names."""
        restarted = []
        for name, entry in self.entries.items():
            code = entry.service.process.poll()
            if code is None or time.monotonic() < entry.next_start_at:
                continue
            print(f"{name} exited with {code}; restarting it on port {entry.service.port} "
                  f"(the others keep serving)", file=self.log, flush=True)
            try:
                entry.service = entry.start(entry.service.port)
            except (RuntimeError, TimeoutError) as exc:
                print(f"{name} failed to restart: {exc}", file=self.log, flush=True)
            entry.restarts += 1
            backoff = min(self.max_backoff_s, self.min_backoff_s * 2 ** min(entry.restarts - 1, 10))
            entry.next_start_at = time.monotonic() + backoff
            restarted.append(name)
        return restarted

    def stop_all(self, sig: int = signal.SIGTERM) -> None:
        for entry in reversed(list(self.entries.values())):
            entry.service.stop(sig)
