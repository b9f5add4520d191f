"""Faults in the real team stack: S3 gone during a run, PostgreSQL restarted during a study."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from cnnlab.experiments import make_config, run

pytestmark = pytest.mark.services


def test_seaweedfs_stopped_during_run_fails_cleanly(on_stack, fmnist_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # the server answers 500 at once; do not wait minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    cfg = make_config("fmnist_cnn", data_dir=str(fmnist_dir), limit=300, epochs=1, run_name="s3-outage")

    def outage(epoch, metrics):
        on_stack.s3.stop()
    try:
        with pytest.raises(MlflowException) as failure:
            run(cfg, on_epoch_end=outage)
        assert "could not store the artifact in its artifact store (S3 down" in failure.value.__notes__[-1]
        assert on_stack.mlflow.healthy()  # the tracking server keeps serving without its artifact store
        (failed,) = mlflow.search_runs(experiment_names=["fmnist_cnn"], output_format="list",
                                       filter_string="attributes.run_name = 's3-outage'")
        assert failed.info.status == "FAILED"
        assert failed.data.tags["error"].startswith(f"The MLflow server {on_stack.mlflow.url} could not store")
        logged = mlflow.search_logged_models(experiment_ids=[failed.info.experiment_id], output_format="list",
                                             filter_string=f"source_run_id = '{failed.info.run_id}'")
        assert all(m.status != "READY" for m in logged)
        with pytest.raises(MlflowException):
            mlflow.register_model(f"runs:/{failed.info.run_id}/model", "s3_outage")
        assert MlflowClient().search_model_versions(f"run_id = '{failed.info.run_id}'") == []
    finally:
        on_stack.s3.start()
        on_stack.s3.ensure_bucket(on_stack.bucket)
    with mlflow.start_run():  # the stack works again once S3 is back
        mlflow.log_dict({"ok": True}, "after.json")


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials read through a short-lived connection (it must not outlive a restart)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []
    finally:
        storage.engine.dispose()


def _tune(spec: dict) -> subprocess.Popen:
    """`cnnlab tune` with two worker processes, as a user starts it."""
    argv = [sys.executable, "-m", "cnnlab", "tune", spec["source"], "--storage", spec["storage"], "--workers", "2",
            "--no-final"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"tuning hung after the PostgreSQL restart:\n{out[-3000:]}")
    return proc.returncode, out


def test_postgres_restart_during_study_resumes(on_stack, tiny_study):
    spec = tiny_study("pg_restart", n_trials=4, epochs=2)
    url, name = spec["storage"], spec["study_name"]
    proc = _tune(spec)
    deadline = time.monotonic() + 240
    while not any(t.state == TrialState.COMPLETE for t in _trials(url, name)):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no trial completed in 240 s"
        time.sleep(1)
    before = {t.number: t.value for t in _trials(url, name) if t.state == TrialState.COMPLETE}
    on_stack.postgres.stop()
    on_stack.postgres.start()
    code, out = _finish(proc, 300)
    print(f"first `cnnlab tune` after the restart: exit {code}; {out[-600:]}")
    assert code == 0 or "run the same command again to resume" in out, out[-3000:]  # reconnected, or stopped cleanly

    code, out = _finish(_tune(spec), 300)  # re-run: resumes the same study
    assert code == 0, out[-3000:]
    after = _trials(url, name)
    assert {t.number: t.value for t in after if t.number in before} == before  # no completed trial lost
    assert not [t.number for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state == TrialState.COMPLETE for t in after) >= len(before)
    assert sum(t.state != TrialState.WAITING for t in after) >= spec["n_trials"]
