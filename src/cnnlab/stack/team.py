"""The team stack: PostgreSQL (MLflow store + Optuna storage), SeaweedFS S3 and `mlflow server` with MLflow's
basic-auth app, all on loopback unless asked otherwise. Every secret is generated, kept in a file that is 0600 from
its creation under the stack's root, and handed to a process by file or environment, never on a command line."""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from cnnlab.stack.mlflow_server import ADMIN, MlflowServer, ROLES, WORKSPACE, auth_ini, aws_credentials
from cnnlab.stack.postgres import DB_OWNERS, Postgres
from cnnlab.stack.seaweedfs import SeaweedFS, weed_security
from cnnlab.stack.secrets import credentials, make_tls, new_password, pgpass_password, private_value, write_credentials, write_pgpass, write_private, write_worker_credentials
from cnnlab.stack.supervisor import HOST, get_ok

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


DEFAULT_ROOT = Path(os.environ.get("CNNLAB_STACK_DIR", ".cnnlab/stack"))



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
        self.root.mkdir(mode=0o711, parents=True, exist_ok=True)
        self._tighten()
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

    def _tighten(self) -> None:
        """A stack made by an older cnnlab, once: nothing in it that another local user reaches (folders 0700; the
        root and postgres/ 0711, so the PostgreSQL OS user passes through to its own folder; files in those 0600)."""
        passable = {self.root, self.postgres.root}
        reachable = passable | {sock.parent for sock in self.s3.grpc_sockets()}
        loose = 0
        for path in [*_tree(self.root), *self.s3.grpc_sockets()]:
            with contextlib.suppress(FileNotFoundError):  # a running service removed it meanwhile
                mode = path.lstat().st_mode
                if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or path.parent in reachable):
                    continue  # in a 0700 folder, out of reach whatever its mode (weed makes its *.vif files 0644)
                want = 0o711 if path in passable else stat.S_IMODE(mode) & 0o700
                if stat.S_IMODE(mode) != want:
                    path.chmod(want)
                    loose += 1
        if loose:
            print(f"cnnlab stack: {loose} files and folders in {self.root} were open to other local users: made them "
                  f"private; restart a running stack (`cnnlab stack down`, `cnnlab stack up`) so its services "
                  f"create private files too", file=sys.stderr)

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
        if not get_ok(f"{url}/health"):
            raise RuntimeError(f"the MLflow server {url} does not answer: run `cnnlab stack up`")
        with credentials(admin):
            yield get_app_client("basic-auth", tracking_uri=url)

    def manage(self, tracking_uri: str, admin_credentials: Path | str) -> "Stack":
        """Manage the users of another server (docker compose's) with its admin's credentials file."""
        self.server = (tracking_uri.rstrip("/"), Path(admin_credentials))
        return self

    def _roles(self) -> dict[str, int]:
        """MLflow roles by name (created on first use): `team` writes to every experiment, run and model of the
        others and creates new ones; `read-only` reads them. A user without a role: see auth_ini."""
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

    def add_user(self, name: str, read_only: bool = False, out: Path | str | None = None,
                 worker: bool = False) -> dict:
        """A new MLflow user with a generated password, written to a 0600 credentials file; a teammate unless
        `read_only` (reads everything, changes nothing of the team's). A `worker`'s file also names the server and
        the Optuna storage, with the storage's password file beside it: all a tuning worker on another host needs."""
        if worker and read_only:
            raise ValueError("a tuning worker writes runs: it cannot be --read-only")
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
        if worker:
            write_worker_credentials(path, name, password, self.urls(), self._role_password("optuna"))
        else:
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


def _tree(root: Path) -> list[Path]:
    """Every folder and file under `root` (itself too), symbolic links not followed."""
    return [Path(top) / name for top, _, files in os.walk(root) for name in ["", *files]]


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
