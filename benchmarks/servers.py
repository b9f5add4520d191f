"""Model servers for the tests and benchmarks: `mlflow models serve` or `cnnlab serve` as a supervised process."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from cnnlab.stack.supervisor import HOST, Daemon, console_script, free_port, get_ok
from cnnlab.tracking.runs import access_error


class ModelServer(Daemon):
    """A registered model (e.g. models:/NAME@champion) served in this environment by `mlflow models serve`, or with
    `guarded` by `cnnlab serve` (MLflow's app behind limits); `env` is added to the server's environment."""

    name = "model-server"

    def __init__(self, root: Path | str, model_uri: str, tracking_uri: str, port: int = 0, workers: int = 1,
                 guarded: bool = False, env: dict[str, str] | None = None, trust_model_code: bool = False):
        super().__init__(root)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.port = port or free_port()
        self.workers, self.guarded, self.extra_env, self.trust = workers, guarded, env or {}, trust_model_code

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        if self.guarded:
            return [sys.executable, "-m", "cnnlab", "serve", self.model_uri, "--host", HOST, "-p", str(self.port),
                    "-w", str(self.workers), *(["--trust-model-code"] if self.trust else [])]
        return [console_script("mlflow"), "models", "serve", "-m", self.model_uri, "--env-manager", "local",
                "-h", HOST, "-p", str(self.port), "-w", str(self.workers)]

    def marker(self) -> str:
        return f"-p {self.port} "

    def env(self) -> dict[str, str]:
        # `mlflow models serve` runs `uvicorn` from PATH: this environment's first
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": self.tracking_uri, **self.extra_env}

    def healthy(self) -> bool:
        """Ready to answer: `cnnlab serve` says so once its workers' model is loaded, MLflow's server at once."""
        return get_ok(f"{self.url}/ready" if self.guarded else f"{self.url}/ping")

    def start(self, timeout: float = 90) -> "ModelServer":
        """As Daemon.start; a model the tracking server refused to hand out fails with one line saying why."""
        try:
            super().start(timeout)
        except RuntimeError as e:
            denied = access_error(self.log.read_text(errors="replace")[-5000:], self.tracking_uri)
            if denied:
                raise RuntimeError(f"cannot serve {self.model_uri}: {denied}") from e
            raise
        return self

    def processes(self) -> list[int]:
        """The server's process and its descendants (`mlflow models serve` runs uvicorn, uvicorn its workers)."""
        pids = [self.pid()] if self.running() else []
        for pid in pids:  # grows while it is walked
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += map(int, (task / "children").read_text().split())
        return pids


def status_kb(pid: int, field: str) -> int:
    """A memory figure of a process in kB from /proc: VmRSS (now) or VmHWM (its peak so far)."""
    line = next(li for li in Path(f"/proc/{pid}/status").read_text().splitlines() if li.startswith(f"{field}:"))
    return int(line.split()[1])


