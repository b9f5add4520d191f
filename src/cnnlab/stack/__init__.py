"""The team stack on loopback: PostgreSQL, SeaweedFS, the mlflow server with accounts, their users and secrets."""
from cnnlab.stack.mlflow_server import SERVER_ENV, MlflowServer
from cnnlab.stack.postgres import PG_BIN, Postgres
from cnnlab.stack.seaweedfs import SeaweedFS
from cnnlab.stack.secrets import CREDENTIAL_KEYS, credentials, read_env_file, write_pgpass
from cnnlab.stack.team import Stack, docker_secrets

__all__ = ["CREDENTIAL_KEYS", "PG_BIN", "SERVER_ENV", "MlflowServer", "Postgres", "SeaweedFS", "Stack", "credentials",
           "docker_secrets", "read_env_file", "write_pgpass"]
