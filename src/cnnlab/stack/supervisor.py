"""Detached server processes: ports, pid files, logs, health checks, stopping."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for(check, what: str, timeout: float = 60.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check()` until truthy; fail with the log's tail if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    exited = proc is not None and proc.poll() is not None
    state = f"exited with {proc.returncode}" if exited else f"not ready in {timeout:.0f}s"
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} {state}" + (f"; log {log}:\n{tail}" if tail else ""))


PRIVATE = 0o077  # the umask of the stack's services: what they create only their own user reads


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600 from the file's creation (a new file renamed over any old one); a missing
    folder is made 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def saved_ports(path: Path) -> dict[str, int]:
    return json.loads(path.read_text()) if path.exists() else {}


def reserve_ports(path: Path, wanted: dict[str, int]) -> dict[str, int]:
    """Ports by name: a non-zero wish, else the one saved in `path` if free (same URLs after a restart), else new."""
    saved = saved_ports(path)
    ports = {}
    for name, port in wanted.items():
        if not port and saved.get(name) and not port_open(saved[name]):
            port = saved[name]
        ports[name] = port or free_port()
    write_private(path, json.dumps({**saved, **ports}))
    return ports


# --- secrets ---------------------------------------------------------------------------------------------------

def _alive(pid: int, marker: str) -> bool:
    """`pid` runs and is ours (its command line holds `marker`), not a zombie or a recycled pid."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own exited child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and marker in cmdline


class Daemon:
    """A detached server process (own session, so `stack up` can exit) with a pid file and a log in `root`."""

    name = "daemon"

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.pidfile = self.root / f"{self.name}.pid"
        self.log = self.root / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def healthy(self) -> bool:
        raise NotImplementedError

    def marker(self) -> str:
        """Text in our process's command line that tells it from a recycled pid."""
        return str(self.root)

    def pid(self) -> int | None:
        if not self.pidfile.exists():
            return None
        pid = int(self.pidfile.read_text())
        return pid if _alive(pid, self.marker()) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 90) -> "Daemon":
        """Start unless running; wait until healthy; idempotent."""
        if not self.running():
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            with os.fdopen(os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log:
                proc = subprocess.Popen(self.argv(), cwd=self.root, env=self.env(), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, umask=PRIVATE)
            write_private(self.pidfile, str(proc.pid))
        else:
            proc = None
        wait_for(self.healthy, self.name, timeout, proc, self.log)
        return self

    def kill(self) -> None:
        """SIGKILL to the whole process group at once: a crash, as a fault test injects it."""
        pid = self.pid()
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)
            wait_for(lambda: not _alive(pid, self.marker()), f"{self.name} exit after SIGKILL", 10)

    def stop(self, grace: float = 5) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds; idempotent."""
        pid = self.pid()
        if pid is not None:
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + wait
                while _alive(pid, self.marker()) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _alive(pid, self.marker()):
                    break
        self.pidfile.unlink(missing_ok=True)


def get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def console_script(name: str) -> str:
    """A console script of this environment (the venv need not be on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)
