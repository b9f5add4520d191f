"""PostgreSQL 15: the MLflow store, its users and the Optuna storage, SCRAM passwords over TCP only."""
from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path
from cnnlab.stack.secrets import private_value, scram_verifier, write_private
from cnnlab.stack.supervisor import HOST, PRIVATE, reserve_ports, saved_ports, wait_for

PG_BIN = Path(os.environ.get("CNNLAB_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_SUPERUSER = "cnnlab"  # bootstrap superuser: only `cnnlab stack` uses it, clients never
DB_OWNERS = {"mlflow": ("mlflow", "mlflow_auth"), "optuna": ("optuna",)}  # login role -> the databases it owns
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


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
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, umask=PRIVATE)
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
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)  # the service user passes through, lists nothing
        self.pgdata.mkdir(mode=0o700)
        self.log.touch(mode=0o600)
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
