"""`mlflow server` with MLflow's basic-auth app, its store in PostgreSQL and artifacts in S3."""
from __future__ import annotations

import os
from pathlib import Path
from cnnlab.stack.postgres import Postgres
from cnnlab.stack.seaweedfs import SeaweedFS
from cnnlab.stack.secrets import new_password, private_value, read_env_file, write_credentials, write_private
from cnnlab.stack.supervisor import Daemon, HOST, console_script, get_ok, reserve_ports, saved_ports

ADMIN = "admin"
WORKSPACE = "default"  # every resource lives in MLflow's default workspace; roles grant access to it
ROLES = {  # MLflow role -> (resource type, pattern, permission); only `team` may create experiments and models
    "team": [("workspace", "*", "USE"), ("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT")],
    "read-only": [("experiment", "*", "READ"), ("registered_model", "*", "READ")],
}

# fail an upload fast when S3 is down rather than retry for minutes behind the client's own retries;
# no GenAI job runner (it forks seven queue consumers)
SERVER_ENV = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "2",
              "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def auth_ini(database_uri: str) -> str:
    """MLflow's basic_auth.ini: users and roles in `database_uri`; what a user may do comes from its role (ROLES)."""
    # default_permission is the floor only for members of the workspace (workspace USE: role `team`) on resources
    # without a grant; with no default workspace access, a user without a role is no member: its searches come back
    # empty and every experiment, run, artifact and model answers 403
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
        return [console_script("mlflow"), "server", "--app-name", "basic-auth", "--enable-workspaces",
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
        return get_ok(f"{self.url}/health")
