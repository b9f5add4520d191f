"""The team stack: PostgreSQL (MLflow store + Optuna storage), SeaweedFS S3 and `mlflow server` with MLflow's
basic-auth app, all on loopback unless asked otherwise. Every secret is generated, kept in a file that is 0600 from
its creation under the stack's root, and handed to a process by file or environment, never on a command line."""
from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import ipaddress
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
PG_SUPERUSER = "cnnlab"  # bootstrap superuser: only `cnnlab stack` uses it, clients never
DB_OWNERS = {"mlflow": ("mlflow", "mlflow_auth"), "optuna": ("optuna",)}  # login role -> the databases it owns
ADMIN = "admin"
WORKSPACE = "default"  # every resource lives in MLflow's default workspace; roles grant access to it
ROLES = {  # MLflow role -> (resource type, pattern, permission); only `team` may create experiments and models
    "team": [("workspace", "*", "USE"), ("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT")],
    "read-only": [("experiment", "*", "READ"), ("registered_model", "*", "READ")],
}
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


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


# --- secrets ---------------------------------------------------------------------------------------------------

def new_password() -> str:
    return secrets.token_urlsafe(24)  # 32 characters of [A-Za-z0-9_-]: safe in URLs, pgpass and env files


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600 from the file's creation (a new file renamed over any old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def private_value(path: Path) -> str:
    """The secret kept in `path`, generated on first use."""
    if not path.exists():
        write_private(path, new_password() + "\n")
    return path.read_text().strip()


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (the credentials files `cnnlab stack user` writes)."""
    lines = [line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in lines}


def write_credentials(path: Path, username: str, password: str) -> Path:
    return write_private(path, f"MLFLOW_TRACKING_USERNAME={username}\nMLFLOW_TRACKING_PASSWORD={password}\n")


def pgpass_password(path: Path, role: str) -> str | None:
    """The password of `role` in a PostgreSQL password file (lines host:port:database:user:password)."""
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) == 5 and fields[3] == role:
            return fields[4]
    return None


def write_pgpass(path: Path, role: str, databases: tuple[str, ...], password: str) -> Path:
    """A password file for `role` on any host and port (a tunnel's port too), read by libpq via PGPASSFILE."""
    return write_private(path, "".join(f"*:*:{db}:{role}:{password}\n" for db in databases))


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """PostgreSQL's SCRAM-SHA-256 verifier, computed here so the clear password never reaches the server or its log."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


def make_tls(folder: Path) -> None:
    """A private CA and one certificate (client and server) for every SeaweedFS component; weed checks no host names."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: str, signer, *extensions):
        builder = (x509.CertificateBuilder().public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=3650)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))])
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    write_private(folder / "tls.key", pem)
    write_private(folder / "ca.crt", cert("cnnlab-ca", ca_key, "cnnlab-ca", ca_key,
                                          (x509.BasicConstraints(ca=True, path_length=0), True)))
    write_private(folder / "tls.crt", cert("seaweedfs", key, "cnnlab-ca", ca_key, (usage, False), (names, False)))


# --- PostgreSQL ------------------------------------------------------------------------------------------------

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


def _identifier(name: str, what: str) -> str:
    if not IDENTIFIER.fullmatch(name):
        raise ValueError(f"{what} {name!r} must be a plain identifier (letters, digits, _)")
    return name


HBA = """# cnnlab: every connection over TCP with a SCRAM-SHA-256 password; no unix socket, no trust
host    all    all    all    scram-sha-256
"""


class Postgres:
    """A PostgreSQL 15 cluster in root/pgdata: TCP only, SCRAM passwords; the superuser's password stays in root."""

    def __init__(self, root: Path | str, port: int = 0, host: str = HOST):
        self.root = Path(root).resolve()
        self.pgdata = self.root / "pgdata"
        self.log = self.root / "postgres.log"
        self.password_file = self.root / "superuser.password"
        self.port = port or saved_ports(self.root / "ports.json").get("postgres", 0)
        self.host = host
        self.user = PG_SUPERUSER
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

    def _give(self, path: Path) -> None:
        if self.os_user:
            shutil.chown(path, self.os_user, self.os_user)

    def _initdb(self) -> None:
        self.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.pgdata.mkdir(mode=0o700)
        self.log.touch()
        for path in (self.pgdata, self.log):
            self._give(path)
        reachable = ["runuser", "-u", self.os_user or "", "--", "test", "-w", str(self.pgdata)]
        if self.os_user and subprocess.run(reachable).returncode:
            raise RuntimeError(f"OS user {self.os_user!r} cannot reach {self.pgdata}: "
                               f"a parent folder is not traversable (chmod o+x), choose another root")
        pwfile = write_private(self.root / "initdb.password", self.superuser_password() + "\n")
        self._give(pwfile)  # initdb runs as the service user and reads it once
        try:
            self._run("initdb", "-D", str(self.pgdata), "-U", self.user, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                      "-E", "UTF8", "--locale=C", "--no-sync")
        finally:
            pwfile.unlink(missing_ok=True)
        (self.pgdata / "pg_hba.conf").write_text(HBA)

    def superuser_password(self) -> str:
        return private_value(self.password_file)

    def _trusting(self) -> bool:
        """pg_hba.conf lets someone in without a password (a cluster made by an older cnnlab with --auth=trust)."""
        lines = (self.pgdata / "pg_hba.conf").read_text().splitlines()
        return any(line.split()[-1] == "trust" for line in lines if line.strip() and not line.lstrip().startswith("#"))

    def _require_passwords(self) -> None:
        """Upgrade a trust cluster: give the superuser a password, then demand SCRAM passwords of everyone."""
        import psycopg2

        print(f"cnnlab stack: {self.pgdata} let anyone at its port in as superuser (trust): setting a password "
              f"and requiring scram-sha-256", file=sys.stderr)
        conn = psycopg2.connect(host=HOST, port=self.port, user=self.user, dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'ALTER ROLE "{self.user}" PASSWORD %s', (scram_verifier(self.superuser_password()),))
        finally:
            conn.close()
        (self.pgdata / "pg_hba.conf").write_text(HBA)
        self._run("pg_ctl", "reload", "-D", str(self.pgdata))
        wait_for(lambda: not self._accepts_without_password(), "PostgreSQL requiring passwords", 30, log=self.log)

    def _accepts_without_password(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(host=HOST, port=self.port, user=self.user, dbname="postgres", password="",
                             connect_timeout=5, passfile=str(self.root / "no-passfile")).close()
            return True
        except psycopg2.OperationalError:
            return False

    def start(self) -> "Postgres":
        """initdb if needed, start, wait until it accepts connections, require passwords; idempotent."""
        if not (self.pgdata / "PG_VERSION").exists():
            if self.pgdata.exists():
                shutil.rmtree(self.pgdata)  # a half-done initdb
            self._initdb()
        if self.running():
            self.port = int((self.pgdata / "postmaster.pid").read_text().splitlines()[3])
        else:
            self.port = reserve_ports(self.root / "ports.json", {"postgres": self.port})["postgres"]
            listen = "*" if self.host in ("0.0.0.0", "*") else ",".join(dict.fromkeys((HOST, self.host)))
            options = (f"-c listen_addresses='{listen}' -p {self.port} -c unix_socket_directories='' "
                       f"-c max_connections=200 -c password_encryption=scram-sha-256")
            self._run("pg_ctl", "start", "-D", str(self.pgdata), "-l", str(self.log), "-w", "-t", "60", "-o", options)
            wait_for(self.accepts, f"PostgreSQL on {HOST}:{self.port}", 30, log=self.log)
        if self._trusting():
            self._require_passwords()
        return self

    def accepts(self) -> bool:
        return self._run("pg_isready", "-h", HOST, "-p", str(self.port), "-U", self.user, check=False).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """Shut down: `fast` rolls back open transactions, `immediate` is a crash (recovery at the next start)."""
        if self.running():
            self._run("pg_ctl", "stop", "-D", str(self.pgdata), "-m", mode, "-w", "-t", "60")

    @contextlib.contextmanager
    def admin(self, database: str = "postgres"):
        """An autocommit cursor of the superuser (its password from root, never from a client's environment)."""
        import psycopg2

        conn = psycopg2.connect(host=HOST, port=self.port, user=self.user, password=self.superuser_password(),
                                dbname=database, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    def ensure_role(self, name: str, password: str) -> None:
        """A login role that is no superuser and creates neither databases nor roles; (re)sets its password."""
        _identifier(name, "role name")
        with self.admin() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,))
            verb = "ALTER" if cur.fetchone() else "CREATE"
            cur.execute(f'{verb} ROLE "{name}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS '
                        f"PASSWORD %s", (scram_verifier(password),))

    def create_database(self, name: str, owner: str = PG_SUPERUSER) -> None:
        """The database `name` owned by `owner`, which alone (with the superuser) may connect to it."""
        _identifier(name, "database name")
        _identifier(owner, "role name")
        with self.admin() as cur:
            cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (name,))
            row = cur.fetchone()
            if row is None:
                cur.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')
            elif row[0] != owner:
                cur.execute(f'ALTER DATABASE "{name}" OWNER TO "{owner}"')
                self._hand_over(name, owner)
            cur.execute(f'REVOKE ALL ON DATABASE "{name}" FROM PUBLIC')

    def _hand_over(self, database: str, owner: str) -> None:
        """Give `owner` the tables, sequences, views and types in `database` (made by the superuser before roles)."""
        kinds = {"r": "TABLE", "p": "TABLE", "v": "VIEW", "m": "MATERIALIZED VIEW", "S": "SEQUENCE"}
        with self.admin(database) as cur:
            for relkinds in (("r", "p"), ("v", "m", "S")):  # tables first: they take their own sequences along
                cur.execute("SELECT c.relkind, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                            "WHERE n.nspname = 'public' AND c.relkind = ANY(%s) AND pg_get_userbyid(c.relowner) <> %s",
                            (list(relkinds), owner))
                for kind, relname in cur.fetchall():
                    cur.execute(f'ALTER {kinds[kind]} public."{relname}" OWNER TO "{owner}"')
            cur.execute("SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                        "WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd') AND pg_get_userbyid(t.typowner) <> %s",
                        (owner,))
            for (typname,) in cur.fetchall():
                cur.execute(f'ALTER TYPE public."{typname}" OWNER TO "{owner}"')

    def url(self, database: str = "postgres", user: str = PG_SUPERUSER) -> str:
        """A SQLAlchemy URL without a password: libpq finds it in PGPASSFILE (or ~/.pgpass)."""
        host = HOST if self.host in (HOST, "0.0.0.0", "*") else self.host
        return f"postgresql+psycopg2://{user}@{host}:{self.port}/{database}"


# --- processes -------------------------------------------------------------------------------------------------

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


# --- SeaweedFS -------------------------------------------------------------------------------------------------

def weed_security(tls: Path, keys: dict[str, str]) -> str:
    """security.toml: JWT-signed writes to volumes and reads/writes to the filer, mutual TLS on every internal
    port (HTTP and gRPC) of master, volume and filer, no UIs. Only the S3 gateway (its own keys) serves clients."""
    files = f'cert = "{tls}/tls.crt"\nkey = "{tls}/tls.key"\n'
    return "\n".join([
        f'[jwt.signing]\nkey = "{keys["volume"]}"\n', f'[jwt.filer_signing]\nkey = "{keys["filer"]}"\n',
        f'[jwt.filer_signing.read]\nkey = "{keys["filer_read"]}"\n', "[access]\nui = false\n",
        "[filer.expose_directory_metadata]\nenabled = false\n", f'[grpc]\nca = "{tls}/ca.crt"\n',
        *(f"[grpc.{part}]\n{files}" for part in ("master", "volume", "filer", "s3", "client")),
        *(f'[https.{part}]\n{files}ca = "{tls}/ca.crt"\n' for part in ("master", "volume", "filer")),
        f'[https.client]\nenabled = true\n{files}ca = "{tls}/ca.crt"\n'])


class SeaweedFS(Daemon):
    """`weed server`: master, volume, filer and S3 on loopback; S3 needs its key, the rest a client certificate."""

    name = "seaweedfs"
    PORTS = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
    INTERNAL = PORTS[2:]

    def __init__(self, root: Path | str, port: int = 0):
        super().__init__(root)
        self.wanted = {"s3": port}
        self.ports = saved_ports(self.root / "ports.json")
        self.config = self.root / "s3.json"
        self.security = self.root / "security.toml"  # weed reads ./security.toml: it runs in root
        self.tls = self.root / "tls"

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports.get('s3', 0)}"

    def credentials(self) -> dict[str, str]:
        """The one S3 identity (created with a random secret on first use); the MLflow server and admins use it."""
        if not self.config.exists():
            identity = {"name": "cnnlab", "credentials": [{"accessKey": "cnnlab", "secretKey": secrets.token_hex(16)}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
            write_private(self.config, json.dumps({"identities": [identity]}))
        cred = json.loads(self.config.read_text())["identities"][0]["credentials"][0]
        return {"AWS_ACCESS_KEY_ID": cred["accessKey"], "AWS_SECRET_ACCESS_KEY": cred["secretKey"],
                "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def rotate_credentials(self) -> None:
        """A new S3 secret key (takes effect at the next start)."""
        self.config.unlink(missing_ok=True)
        self.credentials()

    def _secure(self) -> None:
        """security.toml and the TLS files, generated once."""
        if not (self.tls / "tls.crt").exists():
            make_tls(self.tls)
        if not self.security.exists():
            keys = {k: secrets.token_hex(32) for k in ("volume", "filer", "filer_read")}
            write_private(self.security, weed_security(self.tls, keys))

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

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}  # none overrides security.toml

    def pid(self) -> int | None:
        if not self.ports.get("s3"):
            return None
        return super().pid()

    def start(self, timeout: float = 90) -> "SeaweedFS":
        if not self.running():
            self.ports = reserve_ports(self.root / "ports.json", {k: self.wanted.get(k, 0) for k in self.PORTS})
            (self.root / "data").mkdir(parents=True, exist_ok=True)
            self.credentials()
            self._secure()
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


# --- MLflow ----------------------------------------------------------------------------------------------------

# fail an upload fast when S3 is down rather than retry for minutes behind the client's own retries;
# no GenAI job runner (it forks seven queue consumers)
SERVER_ENV = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "2",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def auth_ini(database_uri: str) -> str:
    """MLflow's basic_auth.ini: users and roles in `database_uri`; what a user may do comes from its role (ROLES)."""
    return (f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {database_uri}\nadmin_username = {ADMIN}\n"
            f"authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            f"grant_default_workspace_access = false\n"
            # a checked password is trusted for 60 s (else every request pays a scrypt hash); a password change
            # takes effect at once on the worker that made it, on other workers within the 60 s
            f"auth_cache_ttl_seconds = 60\n")


def aws_credentials(cred: dict[str, str]) -> str:
    """An AWS shared credentials file (AWS_SHARED_CREDENTIALS_FILE) for the S3 identity."""
    return (f"[default]\naws_access_key_id = {cred['AWS_ACCESS_KEY_ID']}\n"
            f"aws_secret_access_key = {cred['AWS_SECRET_ACCESS_KEY']}\n")

class MlflowServer(Daemon):
    """`mlflow server --app-name basic-auth`: runs in PostgreSQL as role `mlflow` (its password in a PGPASSFILE),
    users and permissions in database `mlflow_auth`, artifacts proxied to S3 (clients need no S3 key)."""

    name = "mlflow"

    def __init__(self, root: Path | str, postgres: Postgres, s3: SeaweedFS, bucket: str = "mlflow",
                 port: int = 0, workers: int = 1, host: str = HOST, admin_credentials: Path | None = None):
        super().__init__(root)
        self.postgres, self.s3, self.bucket, self.workers, self.host = postgres, s3, bucket, workers, host
        self.wanted = port
        self.port = saved_ports(self.root / "ports.json").get("mlflow", 0)
        self.pgpass = self.root / "pgpass"
        self.auth_config = self.root / "basic_auth.ini"
        self.aws_credentials = self.root / "aws-credentials"
        self.flask_secret = self.root / "flask-secret"
        self.admin_credentials = admin_credentials or self.root / "admin.env"

    @property
    def url(self) -> str:
        return f"http://{HOST if self.host in (HOST, '0.0.0.0') else self.host}:{self.port}"

    @property
    def artifacts_destination(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    def argv(self) -> list[str]:
        return [_bin("mlflow"), "server", "--app-name", "basic-auth", "--enable-workspaces",
                "--backend-store-uri", self.postgres.url("mlflow", "mlflow"),
                "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
                "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]

    def marker(self) -> str:
        return f"--port {self.port} "  # argv ends in a space too: no prefix of a longer port matches

    def _write_config(self) -> None:
        """The files the server reads its secrets from (the admin's password is used only to create the admin)."""
        write_private(self.aws_credentials, aws_credentials(self.s3.credentials()))
        write_private(self.auth_config, auth_ini(self.postgres.url("mlflow_auth", "mlflow")))
        if not self.admin_credentials.exists():
            write_credentials(self.admin_credentials, ADMIN, new_password())
        private_value(self.flask_secret)

    def env(self) -> dict[str, str]:
        """Secrets by file (PGPASSFILE, AWS_SHARED_CREDENTIALS_FILE); no inherited AWS keys or MLflow credentials."""
        mine = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING_", "PG"))}
        return {**mine, **SERVER_ENV, "PGPASSFILE": str(self.pgpass), "MLFLOW_AUTH_CONFIG_PATH": str(self.auth_config),
                "AWS_SHARED_CREDENTIALS_FILE": str(self.aws_credentials), "MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint,
                "MLFLOW_AUTH_ADMIN_PASSWORD": read_env_file(self.admin_credentials)["MLFLOW_TRACKING_PASSWORD"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": private_value(self.flask_secret)}

    def start(self, timeout: float = 120) -> "MlflowServer":
        if not self.running():
            self.port = reserve_ports(self.root / "ports.json", {"mlflow": self.wanted})["mlflow"]
            self._write_config()
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

    def start(self, timeout: float = 90) -> "ModelServer":
        """As Daemon.start; a model the tracking server refused to hand out fails with one line saying why."""
        try:
            super().start(timeout)
        except RuntimeError as e:
            from .tracking import access_error

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


# --- the stack -------------------------------------------------------------------------------------------------

DEFAULT_ROOT = Path(os.environ.get("CNNLAB_STACK_DIR", ".cnnlab/stack"))


@contextlib.contextmanager
def credentials(path: Path):
    """MLflow's client credentials from a `cnnlab stack user` file, for the duration of the block."""
    saved = {k: os.environ.get(k) for k in CREDENTIAL_KEYS}
    os.environ.update({k: v for k, v in read_env_file(path).items() if k in CREDENTIAL_KEYS})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class Stack:
    """PostgreSQL (databases mlflow, mlflow_auth, optuna), SeaweedFS S3 (one bucket), the MLflow server, its users."""

    def __init__(self, root: Path | str = DEFAULT_ROOT, bucket: str = "mlflow", mlflow_port: int = 0,
                 s3_port: int = 0, pg_port: int = 0, workers: int = 1, host: str = HOST):
        self.root = Path(root).resolve()
        self.bucket = bucket
        self.users = self.root / "users"
        self.pgpass = self.root / "pgpass"  # role optuna, for tuning workers: PGPASSFILE=this
        self.postgres = Postgres(self.root / "postgres", pg_port, host)
        self.s3 = SeaweedFS(self.root / "seaweedfs", s3_port)
        self.mlflow = MlflowServer(self.root / "mlflow", self.postgres, self.s3, bucket, mlflow_port, workers, host,
                                   admin_credentials=self.users / f"{ADMIN}.env")
        self.server: tuple[str, Path] | None = None  # another server to manage users of (see `manage`)

    def up(self) -> dict[str, str]:
        """Start what is not running, each waited on until healthy; returns the URLs."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the PostgreSQL OS user must reach its data folder
        self.users.mkdir(mode=0o700, exist_ok=True)
        self.postgres.start()
        for role, databases in DB_OWNERS.items():
            self.postgres.ensure_role(role, self._role_password(role))
            for db in databases:
                self.postgres.create_database(db, owner=role)
        self.s3.start()
        self.s3.ensure_bucket(self.bucket)
        self.mlflow.start()
        self._roles()
        return self.urls()

    def down(self) -> None:
        self.mlflow.stop()
        self.s3.stop()
        self.postgres.stop()

    def urls(self) -> dict[str, str]:
        return {"tracking_uri": self.mlflow.url, "optuna_storage": self.postgres.url("optuna", "optuna"),
                "pgpass": str(self.pgpass), "admin_credentials": str(self.mlflow.admin_credentials),
                "backend_store": self.postgres.url("mlflow", "mlflow"), "s3_endpoint": self.s3.endpoint,
                "artifacts": self.mlflow.artifacts_destination}

    def status(self) -> dict[str, bool]:
        """Each service runs and answers (PostgreSQL accepts connections, S3 a request, MLflow /health)."""
        return {"postgres": self.postgres.running() and self.postgres.accepts(),
                "seaweedfs": self.s3.running() and self.s3.healthy(),
                "mlflow": self.mlflow.running() and self.mlflow.healthy()}

    # -- database roles

    def _pgpass_of(self, role: str) -> Path:
        return self.mlflow.pgpass if role == "mlflow" else self.pgpass

    def _role_password(self, role: str, new: bool = False) -> str:
        path = self._pgpass_of(role)
        password = None if new else pgpass_password(path, role)
        if password is None:
            password = new_password()
            write_pgpass(path, role, DB_OWNERS[role], password)
        return password

    def rotate(self, what: str) -> None:
        """A new password for database role `mlflow` or `optuna` (clients read the new PGPASSFILE at their next
        connection), or a new S3 key (SeaweedFS and the MLflow server restart)."""
        if what == "s3":
            self.mlflow.stop()
            self.s3.stop()
            self.s3.rotate_credentials()
            self.up()
            return
        if what not in DB_OWNERS:
            raise ValueError(f"cannot rotate {what!r}: choose one of {sorted([*DB_OWNERS, 's3'])}")
        old = pgpass_password(self._pgpass_of(what), what)
        password = self._role_password(what, new=True)
        try:
            self.postgres.ensure_role(what, password)
        except Exception:
            write_pgpass(self._pgpass_of(what), what, DB_OWNERS[what], old)  # the file keeps the password in force
            raise

    # -- MLflow users

    @contextlib.contextmanager
    def _admin(self):
        """MLflow's basic-auth client, signed in as the admin (of this stack, or of `server`: see `manage`)."""
        from mlflow.server import get_app_client

        url, admin = self.server or (self.mlflow.url, self.mlflow.admin_credentials)
        if not admin.exists():
            raise RuntimeError(f"no admin credentials in {admin}: run `cnnlab stack up` first")
        if not _get_ok(f"{url}/health"):
            raise RuntimeError(f"the MLflow server {url} does not answer: run `cnnlab stack up`")
        with credentials(admin):
            yield get_app_client("basic-auth", tracking_uri=url)

    def manage(self, tracking_uri: str, admin_credentials: Path | str) -> "Stack":
        """Manage the users of another server (docker compose's) with its admin's credentials file."""
        self.server = (tracking_uri.rstrip("/"), Path(admin_credentials))
        return self

    def _roles(self) -> dict[str, int]:
        """MLflow roles by name (created on first use): `team` writes to every experiment, run and model of the
        others and creates new ones; `read-only` reads them. A user without a role sees nothing."""
        with self._admin() as client:
            roles = {r.name: r.id for r in client.list_roles(WORKSPACE)}
            for name, grants in ROLES.items():
                if name not in roles:
                    roles[name] = client.create_role(WORKSPACE, name, f"cnnlab {name}").id
                    for resource, pattern, permission in grants:
                        client.add_role_permission(roles[name], resource, pattern, permission)
            return roles

    def _credentials_path(self, name: str, out: Path | str | None) -> Path:
        if not USERNAME.fullmatch(name):
            raise ValueError(f"user name {name!r}: use letters, digits and _ . @ - (at most 64)")
        return Path(out) if out else self.users / f"{name}.env"

    def add_user(self, name: str, read_only: bool = False, out: Path | str | None = None) -> dict:
        """A new MLflow user with a generated password, written to a 0600 credentials file; a teammate unless
        `read_only` (reads everything, changes nothing of the team's)."""
        from mlflow.exceptions import MlflowException

        path = self._credentials_path(name, out)
        password = new_password()
        access = "read-only" if read_only else "team"
        role = self._roles()[access]
        with self._admin() as client:
            try:
                client.create_user(name, password)
            except MlflowException as e:
                if "already exists" in str(e) or "RESOURCE_ALREADY_EXISTS" in str(e):
                    raise ValueError(f"MLflow user {name!r} exists: `cnnlab stack user passwd {name}` gives it a "
                                     f"new password") from None
                raise
            client.assign_role(name, role)
        write_credentials(path, name, password)
        return {"user": name, "access": access, "credentials": str(path)}

    def set_password(self, name: str, out: Path | str | None = None) -> dict:
        """A new generated password for an MLflow user (the admin too), written to its credentials file."""
        path = self._credentials_path(name, out)
        password = new_password()
        with self._admin() as client:
            client.update_user_password(name, password)
        write_credentials(path, name, password)
        admin = self.server[1] if self.server else self.mlflow.admin_credentials
        if name == ADMIN and path != admin:
            write_credentials(admin, name, password)
        return {"user": name, "credentials": str(path)}

    def list_users(self) -> list[dict]:
        from mlflow.server.auth.routes import LIST_USERS
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response

        with self._admin():
            url = self.server[0] if self.server else self.mlflow.url
            resp = verify_rest_response(http_request(get_default_host_creds(url), LIST_USERS, "GET"), LIST_USERS)
        users = resp.json()["users"]
        return [{"user": u["username"], "access": "admin" if u["is_admin"] else
                 ",".join(r["name"] for r in u["roles"] if not r["name"].startswith("__")) or "none"} for u in users]

    def remove_user(self, name: str) -> None:
        if name == ADMIN:
            raise ValueError("the admin stays: rotate its password with `cnnlab stack user passwd admin`")
        with self._admin() as client:
            client.delete_user(name)
        self._credentials_path(name, None).unlink(missing_ok=True)


def docker_secrets(folder: Path | str) -> list[str]:
    """The secret files docker/compose.yaml mounts, each 0600; existing ones are kept (a running deployment's
    passwords must not change under it). Returns their names."""
    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in ("postgres_superuser", "mlflow_db_password", "optuna_db_password", "flask_secret"):
        private_value(folder / name)

    def once(name: str, make) -> None:
        if not (folder / name).exists():
            make(folder / name)
    for role, databases in DB_OWNERS.items():
        password = private_value(folder / f"{role}_db_password")
        once(f"{role}_pgpass", lambda path: write_pgpass(path, role, databases, password))
    cred = SeaweedFS(folder).credentials()  # s3.json
    once("aws-credentials", lambda path: write_private(path, aws_credentials(cred)))
    once("basic_auth.ini", lambda path: write_private(path, auth_ini("postgresql+psycopg2://mlflow@postgres:5432/"
                                                                     "mlflow_auth")))
    once("admin.env", lambda path: write_credentials(path, ADMIN, new_password()))
    once("tls.crt", lambda path: make_tls(folder))
    once("security.toml", lambda path: write_private(path, weed_security(
        Path("/run/secrets"), {k: secrets.token_hex(32) for k in ("volume", "filer", "filer_read")})))
    return sorted(p.name for p in folder.iterdir() if p.is_file())
