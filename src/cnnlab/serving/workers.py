"""`cnnlab serve -w N` (N >= 2): uvicorn's supervisor with a warm spare worker, so a dead worker is replaced at once.

uvicorn notices a dead worker within 0.5 s, but its replacement must import torch and MLflow and load the model
before it serves: 25-70 s on a loaded 2-core machine, with capacity lowered meanwhile. Here one spare worker has
already loaded the model and waits; when a worker dies the spare takes its place on the shared socket at once, and a
new spare starts loading. The dead worker's connections were closed by the kernel when it died (clients see a reset,
not a hang, and retry on a live worker); its live gauges are dropped from /metrics.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading

from prometheus_client import multiprocess
from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = logging.getLogger("uvicorn.error")
IN_SERVICE = threading.Event()  # cleared in a warm spare until it takes a dead worker's place
IN_SERVICE.set()


def wait_until_in_service() -> None:
    """In a warm spare, block until it replaces a worker: /ready counts its loaded model only from then on."""
    if not IN_SERVICE.is_set():
        log.info(f"Spare [{os.getpid()}] has loaded the model and waits to replace a worker")
        IN_SERVICE.wait()


class Spare(Process):
    """A worker that loads its app (and so the model) at once but takes connections only once `go` is set."""

    def __init__(self, config, sockets):
        self.go = multiprocessing.get_context("spawn").Event()
        super().__init__(config, sockets)

    def target(self, sockets=None) -> None:  # in the spare's own process
        IN_SERVICE.clear()
        self.config.load()
        self.go.wait()
        IN_SERVICE.set()
        super().target(sockets)


class Supervisor(Multiprocess):
    """uvicorn's Multiprocess (signals, hung-worker checks, shutdown) plus a spare that replaces a dead worker."""

    def init_processes(self) -> None:
        super().init_processes()
        self.spare = self.new_spare()

    def new_spare(self) -> Spare:
        spare = Spare(self.config, self.sockets)
        spare.start()
        return spare

    def keep_subprocess_alive(self) -> None:
        for k, process in enumerate(self.processes):
            if self.should_exit.is_set() or process.process.is_alive():
                continue
            process.join()
            multiprocess.mark_process_dead(process.pid)
            self.spare.go.set()
            log.info(f"Child process [{process.pid}] died; spare [{self.spare.pid}] replaces it")
            self.processes[k], self.spare = self.spare, self.new_spare()
        super().keep_subprocess_alive()  # hung workers: killed and restarted after the health-check time-out

    def terminate_all(self) -> None:
        super().terminate_all()
        self.spare.terminate()

    def join_all(self) -> None:
        super().join_all()
        self.spare.join()
