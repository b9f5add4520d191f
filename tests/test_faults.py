"""Faults injected for real in the team stack, as they happen in production: kill -9 of a training run, of a tuning
worker and of the tuning driver, PostgreSQL crashed (immediate stop), the MLflow server and SeaweedFS killed -9.
Each asserts that nothing completed is lost and that running the same command again finishes the job."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from cnnlab.tracking.experiments import make_config, run

pytestmark = pytest.mark.services
FAST_FAIL = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}  # no minutes of retries


def cnnlab(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`cnnlab ARGS` as a user starts it, in the test's folder (its checkpoints) with the test's environment."""
    return subprocess.Popen([sys.executable, "-m", "cnnlab", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, **(env or {})})


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"`cnnlab` hung:\n{out[-3000:]}")
    return proc.returncode, out


def wait_until(check, what: str, proc: subprocess.Popen | None = None, timeout: float = 240, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{proc.communicate()[0][-3000:]}")
        assert time.monotonic() < deadline, f"no {what} in {timeout:.0f} s"
        time.sleep(poll)
    return result


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def steps(run_id: str, key: str = "val_accuracy") -> list[int]:
    return [m.step for m in MlflowClient().get_metric_history(run_id, key)]


# --- training --------------------------------------------------------------------------------------------------

def checkpoint_run() -> str | None:
    """The run id the training in this folder checkpoints for (written when its run starts)."""
    found = list(Path(".cnnlab/checkpoints").rglob("run_id"))
    return found[0].read_text().strip() if found else None


def epoch_checkpointed(proc: subprocess.Popen) -> None:
    """Return the moment the first epoch's checkpoint lands (the next epoch starts then; its metrics may not be
    logged yet): whatever is done to the run now hits it in the middle of its training."""
    wait_until(lambda: any(Path(".cnnlab/checkpoints").rglob("last.pt")), "first checkpoint", proc, poll=0.01)


def train_args(fmnist_dir, epochs: int = 2, limit: int = 600) -> list[str]:
    return ["train", "fmnist_cnn", "-P", f"data_dir={fmnist_dir}", "-P", f"limit={limit}", "-P", f"epochs={epochs}",
            "-P", "batch_size=64"]


def test_training_killed_mid_epoch_resumes_the_same_run(on_stack, fmnist_dir):
    args = train_args(fmnist_dir)
    code, out = finish(cnnlab(*args), 300)  # the reference: the same command, uninterrupted
    assert code == 0, out[-3000:]
    reference = json.loads(out[out.index("{"):])

    proc = cnnlab(*args)
    epoch_checkpointed(proc)
    proc.kill()  # SIGKILL as epoch 2 starts, perhaps before epoch 1's metrics reached the server
    proc.wait()
    run_id = checkpoint_run()
    assert mlflow.get_run(run_id).info.status == "RUNNING" and steps(run_id) in ([], [1])  # nothing ended it

    code, out = finish(cnnlab(*args), 300)  # the same command again
    assert code == 0, out[-3000:]
    resumed = json.loads(out[out.index("{"):])
    assert resumed["run_id"] == run_id != reference["run_id"]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    for key in ("train_loss", "val_loss", "val_accuracy"):  # every epoch once, as in the uninterrupted run
        ours = [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]
        theirs = [(m.step, m.value) for m in MlflowClient().get_metric_history(reference["run_id"], key)]
        assert sorted(ours) == sorted(theirs), key
    for key in ("val_accuracy", "test_accuracy", "test_macro_f1", "test_macro_auc"):
        assert resumed[key] == reference[key], key


def test_mlflow_server_killed_mid_run(on_stack, fmnist_dir):
    """The run's client retries through the outage; a restarted server takes the rest: nothing is lost."""
    proc = cnnlab(*train_args(fmnist_dir), env={"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"})  # retry 1, 2, 4 ... 64 s
    epoch_checkpointed(proc)
    run_id = checkpoint_run()
    old = on_stack.mlflow.pid()
    on_stack.mlflow.kill()  # SIGKILL to the server and its workers
    assert not on_stack.mlflow.healthy()
    time.sleep(3)  # an outage, not a blip
    on_stack.mlflow.start()
    assert on_stack.mlflow.pid() != old
    code, out = finish(proc, 300)
    assert code == 0, out[-3000:]
    finished = mlflow.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert sorted(set(steps(run_id))) == [1, 2] and "test_accuracy" in finished.data.metrics
    assert finished.data.params["epochs"] == "2"
    logged = mlflow.search_logged_models(experiment_ids=[finished.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    assert [m.status for m in logged] == ["READY"]
    assert mlflow.artifacts.load_dict(f"{finished.info.artifact_uri}/config.json")["epochs"] == 2


def test_seaweedfs_killed_mid_upload(on_stack, fmnist_dir, tmp_path, monkeypatch):
    """kill -9 while an artifact streams into S3: the upload fails with a clear error, no half object appears,
    what was stored before survives, the tracking server keeps serving; a run with S3 down ends FAILED and the
    same command resumes it once S3 is back."""
    for key, value in FAST_FAIL.items():
        monkeypatch.setenv(key, value)
    s3, bucket = on_stack.s3.client(), on_stack.bucket
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(4 << 20))  # 192 MiB: several S3 multipart parts
    mlflow.set_experiment("s3_faults")
    with mlflow.start_run() as active:
        mlflow.log_dict({"before": True}, "before.json")
        errors = []

        def upload():
            try:
                mlflow.log_artifact(str(big))
            except Exception as e:  # noqa: BLE001 - the failure is what the test looks at
                errors.append(e)
        uploading = threading.Thread(target=upload)
        uploading.start()
        wait_until(lambda: any(u["Key"].endswith("/big.bin")
                               for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])),
                   "multipart upload in flight", timeout=120)
        on_stack.s3.kill()
        uploading.join(120)
        assert not uploading.is_alive() and errors, "the upload did not fail"
        assert "/mlflow-artifacts/artifacts/" in str(errors[0]), errors[0]  # the upload through the server failed
    assert on_stack.mlflow.healthy()  # the tracking server keeps serving without its artifact store

    cfg = make_config("fmnist_cnn", data_dir=str(fmnist_dir), limit=300, epochs=1, run_name="s3-outage")
    with pytest.raises(MlflowException):
        run(cfg)
    (failed,) = mlflow.search_runs(experiment_names=["fmnist_cnn"], output_format="list",
                                   filter_string="attributes.run_name = 's3-outage'")
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"].startswith(f"The MLflow server {on_stack.mlflow.url} could not store")

    on_stack.s3.stop()
    on_stack.s3.start()
    on_stack.s3.ensure_bucket(bucket)
    keys = {p["Key"].rsplit("/", 1)[-1] for p in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert "before.json" in keys and "big.bin" not in keys  # kept what was done, no half object
    assert mlflow.artifacts.load_dict(f"{active.info.artifact_uri}/before.json") == {"before": True}
    MlflowClient().log_artifact(active.info.run_id, str(big))  # the same upload, once S3 is back
    (entry,) = [f for f in MlflowClient().list_artifacts(active.info.run_id) if f.path == "big.bin"]
    assert entry.file_size == big.stat().st_size

    resumed = run(cfg)  # the same config again: resumes the FAILED run
    assert resumed["run_id"] == failed.info.run_id
    assert mlflow.get_run(resumed["run_id"]).info.status == "FINISHED"


# --- tuning ----------------------------------------------------------------------------------------------------

def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials read through a short-lived connection (it must not outlive a restart)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []
    finally:
        storage.engine.dispose()


def completed(url: str, name: str) -> dict[int, float]:
    return {t.number: t.value for t in trials(url, name) if t.state == TrialState.COMPLETE}


def tune(spec: dict, env: dict | None = None) -> subprocess.Popen:
    """`cnnlab tune` with two worker processes, as a user starts it."""
    return cnnlab("tune", spec["source"], "--storage", spec["storage"], "--workers", "2", "--no-final", env=env)


def worker_running_a_trial(url: str, name: str) -> int | None:
    """The pid of a worker that runs a trial now (each trial's run is tagged with its worker host:pid)."""
    for t in trials(url, name):
        if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs:
            return int(MlflowClient().get_run(t.user_attrs["mlflow_run_id"]).data.tags["worker"].rsplit(":", 1)[1])
    return None


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def assert_study_whole(spec: dict, kept: dict[int, float], parent_id: str) -> None:
    """Every trial completed before a fault kept its value; none left running; no completed trial run twice; the
    study has its n_trials; the parent run and every trial run ended."""
    url, name = spec["storage"], spec["study_name"]
    after = trials(url, name)
    assert {t.number: t.value for t in after if t.number in kept} == kept
    assert not [t.number for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert len({t.params["lr"] for t in complete}) == len(complete)  # a completed trial is never retried
    retried = {n for t in after for n in t.system_attrs.get("retry_history", [])}
    assert sum(t.number not in retried for t in after) == spec["n_trials"]  # failed ones replaced by their retry
    assert mlflow.get_run(parent_id).info.status == "FINISHED"
    runs = mlflow.search_runs(experiment_names=["fmnist_cnn"], output_format="list",
                              filter_string=f"tags.study = '{name}'")
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert {t.user_attrs["mlflow_run_id"] for t in complete} <= {r.info.run_id for r in runs
                                                                  if r.info.status == "FINISHED"}


def study_parent(url: str, name: str) -> str:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs["mlflow_run_id"]
    finally:
        storage.engine.dispose()


def test_tuning_worker_and_driver_killed(on_stack, tiny_study):
    spec = tiny_study("kills", n_trials=3)
    url, name = spec["storage"], spec["study_name"]

    proc = tune(spec)  # 1: kill -9 one of the two workers in the middle of a trial
    wait_until(lambda: completed(url, name), "completed trial", proc)
    victim = wait_until(lambda: worker_running_a_trial(url, name), "running trial", proc)
    os.kill(victim, signal.SIGKILL)
    code, out = finish(proc, 300)
    assert code == 2 and "1 of 2 workers failed" in out and "run the same command again to resume" in out, out[-3000:]
    parent_id = study_parent(url, name)
    assert mlflow.get_run(parent_id).info.status == "FAILED"
    kept = completed(url, name)

    proc = tune(spec)  # 2: kill -9 the driver itself; its workers must not live on
    workers = wait_until(lambda: worker_running_a_trial(url, name) and
                         [p for p in children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()],
                         "workers running a trial", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_until(lambda: not any(alive(p) for p in workers), "workers exit after their driver died", timeout=10)
    kept.update(completed(url, name))

    time.sleep(5)  # the killed trials' heartbeats go stale (2 missed 2-second beats)
    code, out = finish(tune(spec), 300)  # 3: the same command finishes the study
    assert code == 0, out[-3000:]
    assert study_parent(url, name) == parent_id
    assert_study_whole(spec, kept, parent_id)


def test_postgres_crash_mid_study(on_stack, tiny_study):
    """PostgreSQL (Optuna's storage and MLflow's store) stopped in immediate mode, as in a crash: the study stops
    with a message, nothing completed is lost, and once PostgreSQL is back the same command finishes it."""
    spec = tiny_study("pg_crash", n_trials=3)
    url, name = spec["storage"], spec["study_name"]
    proc = tune(spec, env=FAST_FAIL)
    wait_until(lambda: completed(url, name), "completed trial", proc)
    wait_until(lambda: worker_running_a_trial(url, name), "running trial", proc)
    kept, parent_id = completed(url, name), study_parent(url, name)
    on_stack.postgres.stop(mode="immediate")
    try:
        code, out = finish(proc, 240)
    finally:
        on_stack.postgres.start()
    last = out.strip().splitlines()[-1]
    assert code == 2 and last.startswith("cnnlab tune: error:") and "run the same command again" in last, out[-3000:]
    time.sleep(5)  # heartbeats of the interrupted trials go stale
    code, out = finish(tune(spec), 300)
    assert code == 0, out[-3000:]
    assert study_parent(url, name) == parent_id
    assert_study_whole(spec, kept, parent_id)
