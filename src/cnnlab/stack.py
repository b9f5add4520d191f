"""The team stack on loopback: PostgreSQL (MLflow backend + Optuna storage), SeaweedFS S3, `mlflow server`."""
from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PG_BIN = Path(os.environ.get("CNNLAB_PG_BIN", "/usr/lib/postgresql/15/bin"))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**saved, **ports}))
    return ports


def service_user() -> str | None:
    """The OS user that runs PostgreSQL: None (ourselves) unless we are root, which initdb refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "cnnlab"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "cnnlab"], check=True)
    return "cnnlab"


class Postgres:
    """A PostgreSQL 15 cluster in root/pgdata, TCP on 127.0.0.1 only, trust auth for the bootstrap user."""

    def __init__(self, root: Path | str, port: int = 0, user: str = "cnnlab"):
        self.root = Path(root).resolve()
        self.pgdata = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.port = port or saved_ports(self.root / "ports.json").get("postgres", 0)
        self.user = user
        self.os_user = service_user()

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        if not (PG_BIN / cmd[0]).exists():
            raise RuntimeError(f"PostgreSQL 15 not found in {PG_BIN}: run `make postgres` (apt-get install "
                               f"postgresql-15) or set CNNLAB_PG_BIN to its bin folder")
        argv = [str(PG_BIN / cmd[0]), *cmd[1:]]
        if self.os_user:
            argv = ["runuser", "-u", self.os_user, "--", *argv]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if check and out.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
        return out

    def running(self) -> bool:
        if not self.pgdata.is_dir():
            return False
        return self._run("pg_ctl", "status", "-D", str(self.pgdata), check=False).returncode == 0

    def _initdb(self) -> None:
        self.pgdata.mkdir(mode=0o700, parents=True)
        self.log.touch()
        if self.os_user:
            for path in (self.pgdata, self.log):
                shutil.chown(path, self.os_user, self.os_user)
            if subprocess.run(["runuser", "-u", self.os_user, "--", "test", "-w", str(self.pgdata)]).returncode:
                raise RuntimeError(f"OS user {self.os_user!r} cannot reach {self.pgdata}: "
                                   f"a parent folder is not traversable (chmod o+x), choose another root")
        self._run("initdb", "-D", str(self.pgdata), "-U", self.user, "--auth=trust", "-E", "UTF8",
                  "--locale=C", "--no-sync")

    def start(self) -> "Postgres":
        """initdb if needed, start on 127.0.0.1:port, wait until it accepts connections; idempotent."""
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)  # a half-done initdb
            self._initdb()
        if self.running():
            self.port = int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])
            return self
        self.port = reserve_ports(self.root / "ports.json", {"postgres": self.port})["postgres"]
        options = f"-c listen_addresses={HOST} -p {self.port} -c unix_socket_directories='' -c max_connections=200"
        self._run("pg_ctl", "start", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "60", "-o", options)
        wait_for(self.accepts, f"PostgreSQL on {HOST}:{self.port}", 30, log=self.log)
        return self

    def accepts(self) -> bool:
        return self._run("pg_isready", "-h", HOST, "-p", str(self.port), "-U", self.user, check=False).returncode == 0

    def stop(self) -> None:
        """Fast shutdown (rolls back open transactions); idempotent."""
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60")

    def create_database(self, name: str) -> None:
        """CREATE DATABASE unless it exists."""
        import psycopg2

        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r} must be a plain identifier (letters, digits, _)")
        conn = psycopg2.connect(host=HOST, port=self.port, user=self.user, dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://{self.user}@{HOST}:{self.port}/{database}"


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
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.log, "ab") as log:
                proc = subprocess.Popen(self.argv(), cwd=self.root, env=self.env(), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.pidfile.write_text(str(proc.pid))
        else:
            proc = None
        wait_for(self.healthy, self.name, timeout, proc, self.log)
        return self

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


def _get_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _bin(name: str) -> str:
    """A console script of this environment (the venv need not be on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def ensure_bucket(s3, bucket: str, timeout: float = 60, log: Path | None = None) -> None:
    """Create `bucket` with boto3 client `s3` unless it exists, then wait until a write to it succeeds."""
    def writable() -> bool:
        try:
            if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
                s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key=".cnnlab-health", Body=b"ok")
            return True
        except Exception:  # noqa: BLE001 - not up yet: any client or server error means try again
            return False
    wait_for(writable, f"S3 bucket {bucket!r} at {s3.meta.endpoint_url}", timeout, log=log)


class SeaweedFS(Daemon):
    """`weed server` with master, volume, filer and S3 on loopback; data and S3 credentials in `root`."""

    name = "seaweedfs"
    PORTS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")

    def __init__(self, root: Path | str, port: int = 0):
        super().__init__(root)
        self.wanted = {"s3": port}
        self.ports = saved_ports(self.root / "ports.json")
        self.config = self.root / "s3.json"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports.get('s3', 0)}"

    def credentials(self) -> dict[str, str]:
        """The one S3 identity (created with a random secret on first use); the MLflow server and admins use it."""
        if not self.config.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            identity = {"name": "cnnlab", "credentials": [{"accessKey": "cnnlab", "secretKey": secrets.token_hex(16)}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
            self.config.write_text(json.dumps({"identities": [identity]}))
            self.config.chmod(0o600)
        cred = json.loads(self.config.read_text())["identities"][0]["credentials"][0]
        return {"AWS_ACCESS_KEY_ID": cred["accessKey"], "AWS_SECRET_ACCESS_KEY": cred["secretKey"],
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def client(self):
        import boto3
        from botocore.config import Config

        cred = self.credentials()
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=cred["AWS_DEFAULT_REGION"],
                            aws_access_key_id=cred["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=cred["AWS_SECRET_ACCESS_KEY"],
                            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}))

    def argv(self) -> list[str]:
        p = self.ports
        return [_bin("weed"), "server", f"-dir={self.root / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self.config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-filer.localSocket={self.root / 'filer.sock'}", f"-s3.localSocket={self.root / 's3.sock'}",
                # one node: no raft state to resume, elect at once; small volumes, few of them
                "-master.resumeState=false", "-master.electionTimeout=1s", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=1024", "-volume.max=16"]

    def pid(self) -> int | None:
        if not self.ports.get("s3"):
            return None
        return super().pid()

    def start(self, timeout: float = 90) -> "SeaweedFS":
        if not self.running():
            self.ports = reserve_ports(self.root / "ports.json", {k: self.wanted.get(k, 0) for k in self.PORTS})
            (self.root / "data").mkdir(parents=True, exist_ok=True)
            self.credentials()
        super().start(timeout)
        return self

    def healthy(self) -> bool:
        """S3 answers an authenticated request (the volume server may still be joining: see ensure_bucket)."""
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def ensure_bucket(self, bucket: str, timeout: float = 60) -> None:
        ensure_bucket(self.client(), bucket, timeout, self.log)

    def stop(self, grace: float = 3) -> None:
        """weed's graceful shutdown can hang on a lone node; its stores survive a kill (journaled)."""
        super().stop(grace)
        for key in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc"):  # weed leaves these in /tmp
            kind = key.split("_")[0]
            Path(f"/tmp/seaweedfs-{kind}-grpc-{self.ports.get(key)}.sock").unlink(missing_ok=True)


class MlflowServer(Daemon):
    """`mlflow server`: runs in PostgreSQL, artifacts proxied to S3, so clients need no S3 credentials."""

    name = "mlflow"

    def __init__(self, root: Path | str, postgres: Postgres, s3: SeaweedFS, bucket: str = "mlflow",
                 port: int = 0, workers: int = 1):
        super().__init__(root)
        self.postgres, self.s3, self.bucket, self.workers = postgres, s3, bucket, workers
        self.wanted = port
        self.port = saved_ports(self.root / "ports.json").get("mlflow", 0)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    def argv(self) -> list[str]:
        return [_bin("mlflow"), "server", "--backend-store-uri", self.postgres.url("mlflow"),
                "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
                "--host", HOST, "--port", str(self.port), "--workers", str(self.workers)]

    def marker(self) -> str:
        return f"--port {self.port} "  # argv ends in a space too: no prefix of a longer port matches

    def env(self) -> dict[str, str]:
        # fail an upload fast when S3 is down rather than retry for minutes behind the client's own retries;
        # no GenAI job runner (it forks seven queue consumers)
        return {**os.environ, **self.s3.credentials(), "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "2",
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def start(self, timeout: float = 120) -> "MlflowServer":
        if not self.running():
            self.port = reserve_ports(self.root / "ports.json", {"mlflow": self.wanted})["mlflow"]
        super().start(timeout)
        return self

    def healthy(self) -> bool:
        return _get_ok(f"{self.url}/health")


class ModelServer(Daemon):
    """A registered model (e.g. models:/NAME@champion) served in this environment by `mlflow models serve`, or with
    `guarded` by `cnnlab serve` (MLflow's app behind limits); `env` is added to the server's environment."""

    name = "model-server"

    def __init__(self, root: Path | str, model_uri: str, tracking_uri: str, port: int = 0, workers: int = 1,
                 guarded: bool = False, env: dict[str, str] | None = None):
        super().__init__(root)
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.port = port or free_port()
        self.workers, self.guarded, self.extra_env = workers, guarded, env or {}

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        if self.guarded:
            return [sys.executable, "-m", "cnnlab", "serve", self.model_uri, "--host", HOST, "-p", str(self.port),
                    "-w", str(self.workers)]
        return [_bin("mlflow"), "models", "serve", "-m", self.model_uri, "--env-manager", "local",
                "-h", HOST, "-p", str(self.port), "-w", str(self.workers)]

    def marker(self) -> str:
        return f"-p {self.port} "

    def env(self) -> dict[str, str]:
        # `mlflow models serve` runs `uvicorn` from PATH: this environment's first
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": self.tracking_uri, **self.extra_env}

    def healthy(self) -> bool:
        return _get_ok(f"{self.url}/ping")

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


DEFAULT_ROOT = Path(os.environ.get("CNNLAB_STACK_DIR", ".cnnlab/stack"))


class Stack:
    """PostgreSQL (databases `mlflow` and `optuna`), SeaweedFS S3 (one bucket) and the MLflow server."""

    def __init__(self, root: Path | str = DEFAULT_ROOT, bucket: str = "mlflow", mlflow_port: int = 0,
                 s3_port: int = 0, pg_port: int = 0, workers: int = 1):
        self.root = Path(root).resolve()
        self.bucket = bucket
        self.postgres = Postgres(self.root / "postgres", pg_port)
        self.s3 = SeaweedFS(self.root / "seaweedfs", s3_port)
        self.mlflow = MlflowServer(self.root / "mlflow", self.postgres, self.s3, bucket, mlflow_port, workers)

    def up(self) -> dict[str, str]:
        """Start what is not running, each waited on until healthy; returns the URLs."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the PostgreSQL OS user must reach its data folder
        self.postgres.start()
        for db in ("mlflow", "optuna"):
            self.postgres.create_database(db)
        self.s3.start()
        self.s3.ensure_bucket(self.bucket)
        self.mlflow.start()
        return self.urls()

    def down(self) -> None:
        self.mlflow.stop()
        self.s3.stop()
        self.postgres.stop()

    def urls(self) -> dict[str, str]:
        return {"tracking_uri": self.mlflow.url, "optuna_storage": self.postgres.url("optuna"),
                "backend_store": self.postgres.url("mlflow"), "s3_endpoint": self.s3.endpoint,
                "artifacts": self.mlflow.artifacts_destination}

    def status(self) -> dict[str, bool]:
        """Each service runs and answers (PostgreSQL accepts connections, S3 a request, MLflow /health)."""
        return {"postgres": self.postgres.running() and self.postgres.accepts(),
                "seaweedfs": self.s3.running() and self.s3.healthy(),
                "mlflow": self.mlflow.running() and self.mlflow.healthy()}
