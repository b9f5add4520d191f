"""Optuna studies for real: grid and TPE, pruned and failed trials with their MLflow runs, resume after a killed
worker, two worker processes on one PostgreSQL storage."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from cnnlab import cli
from cnnlab.core import config, devices
from cnnlab.tracking import tuning

SMALL = {"epochs": 1, "limit": 200}  # 200 train / 50 val / 50 test images of 3 Fashion-MNIST classes


def write_space(folder: Path, name: str, **spec) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"experiment": "fmnist_mlp", "fixed": SMALL, **spec}))
    return path


def study_runs(study: str, experiment: str = "fmnist_mlp") -> dict[str, list]:
    """The study's MLflow runs by role: parent, trials (by trial number), final."""
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"tags.study = '{study}'",
                              output_format="list")
    trials = sorted((r for r in runs if "trial_number" in r.data.tags), key=lambda r: int(r.data.tags["trial_number"]))
    return {"parent": [r for r in runs if r.data.tags.get("tuning") == "study"], "trials": trials,
            "final": [r for r in runs if r.data.tags.get("final") == "true"]}


def artifacts(run_id: str, path: str) -> list[str]:
    return sorted(a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path))


def test_grid_study_tracks_every_trial_and_retrains_the_best(fmnist_dir, tmp_path):
    path = write_space(tmp_path, "grid", n_trials=10, sampler={"type": "grid"},
                       space={"dropout": {"type": "categorical", "choices": [0.2, 0.5]},
                              "lr": {"type": "categorical", "choices": ["1e-3", "3e-3"]}})
    spec = tuning.load_spec(path, {"data_dir": str(fmnist_dir)})
    assert spec["n_trials"] == 4  # capped at the grid's size: a rerun never re-evaluates a point
    summary = tuning.tune(spec)

    study = optuna.load_study(study_name="grid", storage="sqlite:///optuna.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert {(t.params["dropout"], t.params["lr"]) for t in study.trials} == {
        (d, lr) for d in (0.2, 0.5) for lr in (1e-3, 3e-3)}
    assert summary["best_value"] == study.best_value and summary["epochs_spent"] == 4

    runs = study_runs("grid")
    parent = runs["parent"][0]
    assert len(runs["parent"]) == 1 and parent.info.status == "FINISHED"
    assert parent.info.run_id == summary["parent_run_id"]
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(study.best_value)
    assert parent.data.tags["best.lr"] == str(study.best_params["lr"])
    assert parent.data.params["space.dropout"] == "[0.2, 0.5]" and parent.data.params["space.lr"] == "[0.001, 0.003]"
    # the parent shows the study as it runs: best so far after every trial (step = trial number)
    best = mlflow.MlflowClient().get_metric_history(parent.info.run_id, "best_val_accuracy")
    running_best = [max(t.value for t in study.trials[: n + 1]) for n in range(4)]
    assert sorted((m.step, m.value) for m in best) == list(enumerate(running_best))
    page = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="study/plots.html"))
    text = page.read_text()
    assert all(f"<h2>{n}</h2>" in text for n in ("optimization history", "parallel coordinate",
                                                 "param importances", "intermediate values"))
    assert text.count("plotly.js v") == 1 and "src=\"https://" not in text  # one embedded copy: renders offline
    csv = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="study/trials.csv"))
    assert len(csv.read_text().splitlines()) == 5

    assert [r.data.tags["trial_number"] for r in runs["trials"]] == ["0", "1", "2", "3"]
    for trial, run in zip(study.trials, runs["trials"], strict=True):
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert float(run.data.params["lr"]) == trial.params["lr"]
        assert run.data.metrics["val_accuracy"] == pytest.approx(trial.value)
        assert "test_accuracy" not in run.data.metrics  # the test split is evaluated once, on the final run

    (final,) = runs["final"]
    assert final.info.status == "FINISHED" and final.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert final.data.tags["best_trial"] == str(study.best_trial.number)
    assert float(final.data.params["dropout"]) == study.best_params["dropout"]
    assert final.data.metrics["test_accuracy"] == pytest.approx(summary["final"]["test_accuracy"])
    assert "model/MLmodel" in artifacts(final.info.run_id, "model")

    again = tuning.tune(spec)  # a finished study: nothing is trained again
    assert again["parent_run_id"] == parent.info.run_id and again["final"]["reused"]
    assert len(study.get_trials()) == 4 and len(study_runs("grid")["trials"]) == 4
    assert not any(Path(".cnnlab/checkpoints").iterdir())  # trials leave no checkpoints behind


def test_pruned_and_failed_trials_are_recorded_as_such(fmnist_dir, tmp_path):
    path = write_space(tmp_path, "bad", n_trials=4, fixed={**SMALL, "epochs": 2},
                       space={"lr": {"type": "float", "low": 1e-8, "high": 1e21, "log": True}},
                       sampler={"type": "tpe", "seed": 0},
                       pruner={"type": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    spec = tuning.load_spec(path, {"data_dir": str(fmnist_dir)})
    study = optuna.create_study(study_name="bad", storage="sqlite:///optuna.db", direction="maximize")
    for lr in (1e-3, 3e-3, 1e-7, 1e20):  # two good, one that barely learns (pruned), one whose loss becomes NaN
        study.enqueue_trial({"lr": lr})
    summary = tuning.tune(spec, final=False)

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert list(trials[2].intermediate_values) == [1]  # stopped after its first of two epochs
    assert (summary["n_complete"], summary["n_pruned"], summary["n_failed"]) == (2, 1, 1)
    assert summary["epochs_spent"] == 2 + 2 + 1 + 0
    assert summary["images_spent"] == 200 * (2 + 2 + 1 + 0)  # a failed epoch reports nothing, so costs nothing here

    runs = study_runs("bad")
    assert [r.info.status for r in runs["trials"]] == ["FINISHED", "FINISHED", "KILLED", "FAILED"]
    pruned, failed = runs["trials"][2], runs["trials"][3]
    assert pruned.data.tags["pruned"] == "true" and "epoch 1" in pruned.data.tags["pruned_reason"]
    assert "error" not in pruned.data.tags
    assert failed.data.tags["error"].startswith("FloatingPointError: loss became")
    assert "pruned" not in failed.data.tags
    assert runs["parent"][0].info.status == "FINISHED" and not runs["final"]


def test_image_budget_counts_each_epoch_at_its_training_size_and_stops_the_study(fmnist_dir, tmp_path):
    path = write_space(tmp_path, "budget", n_trials=10, budget_images=700, fixed={"epochs": 2},
                       space={"limit": {"type": "categorical", "choices": [100, 400]}},
                       enqueue=[{"limit": 100}, {"limit": 400}], sampler={"type": "random", "seed": 0})
    summary = tuning.tune(tuning.load_spec(path, {"data_dir": str(fmnist_dir)}), final=False)

    trials = optuna.load_study(study_name="budget", storage="sqlite:///optuna.db").get_trials()
    # 2 x 100 images fit; the second trial's 2 x 400 would not: cut after its first epoch (it could never complete),
    # and no third trial starts, as no complete trial fits in what is left
    assert [(t.params, t.state) for t in trials] == [({"limit": 100}, TrialState.COMPLETE),
                                                     ({"limit": 400}, TrialState.PRUNED)]
    runs = study_runs("budget")["trials"]
    sizes = [mlflow.artifacts.load_dict(f"runs:/{r.info.run_id}/data_summary.json")["sizes"]["train"] for r in runs]
    assert sizes == [100, 400] and [t.user_attrs["epoch_images"] for t in trials] == sizes
    assert summary["images_spent"] == 2 * 100 + 1 * 400 <= 700 and summary["epochs_spent"] == 3
    assert "would pass the study's budget of 700 training images" in runs[1].data.tags["pruned_reason"]
    assert tuning.tune(tuning.load_spec(path, {"data_dir": str(fmnist_dir)}), final=False)["n_trials"] == 2  # spent


def test_enqueued_points_run_first_and_successive_halving_prunes_from_one_epoch(fmnist_dir, tmp_path):
    path = write_space(tmp_path, "ladder", n_trials=3, fixed={**SMALL, "epochs": 3},
                       space={"lr": {"type": "float", "low": 1e-7, "high": 1e-2, "log": True}},
                       enqueue=[{"lr": "3e-3"}, {"lr": "1e-7"}], sampler={"type": "tpe", "seed": 0},
                       pruner={"type": "successive_halving", "min_resource": 1, "reduction_factor": 3})
    summary = tuning.tune(tuning.load_spec(path, {"data_dir": str(fmnist_dir)}), final=False)

    trials = optuna.load_study(study_name="ladder", storage="sqlite:///optuna.db").get_trials()
    assert [t.params["lr"] for t in trials[:2]] == [3e-3, 1e-7] and all(t.user_attrs["enqueued"] for t in trials[:2])
    assert trials[0].state == TrialState.COMPLETE and len(trials[0].intermediate_values) == 3
    assert trials[1].state == TrialState.PRUNED and list(trials[1].intermediate_values) == [1]  # first rung: 1 epoch
    assert summary["images_spent"] == 200 * sum(len(t.intermediate_values) for t in trials)


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def trials_in(storage: str, name: str) -> list:
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    except KeyError:  # not created yet
        return []


def metric_steps(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)}


@pytest.mark.slow
def test_a_killed_workers_trial_is_retried_from_its_checkpoint(fmnist_dir, tmp_path):
    path = write_space(tmp_path, "resume", experiment="fmnist_cnn", fixed={"epochs": 3, "limit": 600},
                       n_trials=2, heartbeat_interval=1,
                       space={"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                              "dropout": {"type": "float", "low": 0.1, "high": 0.6}},
                       sampler={"type": "tpe", "seed": 0, "n_startup_trials": 2})
    cmd = [sys.executable, "-m", "cnnlab", "tune", str(path), "--no-final", "-P", f"data_dir={fmnist_dir}"]
    worker = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def second_trial_past_epoch_1():
            trials = trials_in("sqlite:///optuna.db", "resume")
            running = [t for t in trials if t.state == TrialState.RUNNING and t.intermediate_values]
            return trials[:1] and trials[0].state == TrialState.COMPLETE and running and trials
        trials = wait_for(second_trial_past_epoch_1, 300, "trial 1 to finish its first epoch")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    killed = next(t for t in optuna.load_study(study_name="resume", storage="sqlite:///optuna.db").get_trials()
                  if t.state == TrialState.RUNNING)
    (checkpoint,) = Path(".cnnlab/checkpoints").glob(f"trial-resume-{killed.number}-*/last.pt")  # this folder's
    parent_id = study_runs("resume", "fmnist_cnn")["parent"][0].info.run_id
    assert mlflow.get_run(killed.user_attrs["mlflow_run_id"]).info.status == "RUNNING"  # nobody ended it
    time.sleep(3)  # past the grace period: two missed heartbeats

    summary = tuning.tune(tuning.load_spec(path, {"data_dir": str(fmnist_dir)}), final=False)

    study = optuna.load_study(study_name="resume", storage="sqlite:///optuna.db")
    after = study.get_trials()
    assert after[0].state == TrialState.COMPLETE and after[0].value == trials[0].value  # kept, not rerun
    assert after[killed.number].state == TrialState.FAIL
    retry = next(t for t in after if t.system_attrs.get("failed_trial") == killed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert [t.state for t in after].count(TrialState.COMPLETE) == 2 and len(after) == 3  # the dead one not counted
    assert summary["n_complete"] == 2 and summary["parent_run_id"] == parent_id
    assert summary["epochs_spent"] == 6 and summary["images_spent"] == 6 * after[0].user_attrs["epoch_images"]
    assert not checkpoint.parent.exists()  # a completed trial is never resumed

    runs = study_runs("resume", "fmnist_cnn")
    assert [r.data.tags["trial_number"] for r in runs["trials"]] == ["0", "1", "2"]
    dead = mlflow.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "heartbeat" in dead.data.tags["error"]
    resumed = mlflow.get_run(retry.user_attrs["mlflow_run_id"])
    assert resumed.data.tags["retry_of_trial"] == str(killed.number) and resumed.data.tags["retry_of_run"] == dead.info.run_id
    carried = int(resumed.data.tags["resumed_from_epoch"])
    assert 1 <= carried < 3 and len(killed.intermediate_values) <= carried
    # the carried epochs were not trained again: their wall time is the dead run's, to the last digit
    dead_seconds, resumed_seconds = metric_steps(dead.info.run_id, "epoch_seconds"), metric_steps(resumed.info.run_id, "epoch_seconds")
    assert sorted(resumed_seconds) == [1, 2, 3]
    assert all(resumed_seconds[step] == dead_seconds[step] for step in dead_seconds)
    assert [r.info.status for r in runs["trials"]].count("FINISHED") == 2
    assert len(runs["parent"]) == 1 and runs["parent"][0].info.status == "FINISHED"


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path):
    """Optuna's own check skips a RUNNING trial with no heartbeat; a worker killed between taking a trial and its
    first beat left one RUNNING for ever, and the study never finished."""
    spec = tuning.load_spec(write_space(tmp_path, "silent", n_trials=2, heartbeat_interval=1,
                                        space={"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}))
    tuning.open_study(spec, tuning.make_storage(spec))
    takes_a_trial = ("import os, signal, sys, optuna; study = optuna.load_study(study_name='silent', "
                     "storage='sqlite:///optuna.db'); trial = study.ask(); trial.suggest_float('lr', 1e-4, 1e-2, "
                     "log=True); print(trial.number, flush=True); sys.stdin.readline()")
    worker = subprocess.Popen([sys.executable, "-c", takes_a_trial], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    number = int(worker.stdout.readline())
    worker.send_signal(signal.SIGKILL)  # it took the trial and dies before any heartbeat
    worker.wait()
    study = optuna.load_study(study_name="silent", storage=tuning.make_storage(spec))
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials()[number].state == TrialState.RUNNING  # not yet past the grace period (2 beats)

    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    after = study.get_trials()
    assert after[number].state == TrialState.FAIL
    (retry,) = [t for t in after if t.system_attrs.get("failed_trial") == number]
    assert retry.state == TrialState.WAITING and retry.params == after[number].params


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster (in a folder its OS user can reach) with databases for Optuna and MLflow."""
    from cnnlab.stack import Postgres, write_pgpass

    root = Path(tempfile.mkdtemp(prefix="cnnlab-tuning-pg-"))
    root.chmod(0o755)
    pg = Postgres(root).start()
    saved = os.environ.get("PGPASSFILE")  # the URLs carry no password: libpq reads it from this file
    os.environ["PGPASSFILE"] = str(write_pgpass(root / "pgpass", pg.user, ("optuna", "mlflow"), pg.superuser_password()))
    try:
        pg.create_database("optuna")
        pg.create_database("mlflow")
        yield pg
    finally:
        if saved is None:
            del os.environ["PGPASSFILE"]
        else:
            os.environ["PGPASSFILE"] = saved
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.services
def test_two_workers_share_one_postgres_study(fmnist_dir, tmp_path, postgres, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres.url("mlflow"))  # parallel writers: a server database
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # a fake 4-GPU host: each worker gets one of its own
    path = write_space(tmp_path, "parallel", n_trials=4, storage=postgres.url("optuna"),
                       space={"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                              "dropout": {"type": "float", "low": 0.1, "high": 0.6}},
                       sampler={"type": "tpe", "seed": 0})
    summary = tuning.tune(tuning.load_spec(path, {"data_dir": str(fmnist_dir)}), workers=2, final=False)

    study = optuna.load_study(study_name="parallel", storage=postgres.url("optuna"))
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials) and summary["n_complete"] == 4
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 4  # no configuration evaluated twice

    mlflow.set_tracking_uri(postgres.url("mlflow"))
    runs = study_runs("parallel")
    assert sorted(int(r.data.tags["trial_number"]) for r in runs["trials"]) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs["trials"]} == {summary["parent_run_id"]}
    assert all(r.info.status == "FINISHED" for r in runs["trials"])
    assert len({r.data.tags["worker"] for r in runs["trials"]}) == 2  # both processes ran trials
    placed = {(r.data.tags["worker"], r.data.tags["cuda_visible_devices"]) for r in runs["trials"]}
    assert sorted(gpu for _, gpu in placed) == ["0", "1"]  # one GPU per worker, never shared


def test_workers_get_disjoint_gpus_from_the_device_list(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # a 4-GPU host, as the environment describes it
    assert devices.place_workers(4) == [["0"], ["1"], ["2"], ["3"]]
    assert devices.place_workers(2, per_worker=2) == [["0", "1"], ["2", "3"]]  # DDP-sized sets
    with pytest.raises(ValueError, match="5 workers x 1 GPU.* need 5 GPUs, this host has 4 .*--workers 4"):
        devices.place_workers(5)
    path = write_space(tmp_path, "crowded", storage="postgresql://u@localhost/optuna",
                       space={"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    with pytest.raises(ValueError, match="need 5 GPUs"):
        tuning.tune(tuning.load_spec(path), workers=5)
    assert mlflow.search_runs(search_all_experiments=True).empty  # refused before any run started
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.place_workers(8) is None  # no GPU: workers share the CPU threads


def test_cli_tune_and_its_errors(fmnist_dir, tmp_path, capsys):
    path = write_space(tmp_path, "one", space={"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    assert cli.main(["tune", str(path), "--n-trials", "1", "--no-final", "--params", f"data_dir={fmnist_dir}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["study"], out["n_complete"]) == ("one", 1) and "final" not in out
    skipped = mlflow.artifacts.load_dict(f"runs:/{out['parent_run_id']}/study/summary.json")["skipped_plots"]
    assert "2 complete trials" in skipped["param_importances"]

    assert cli.main(["tune", str(path), "--workers", "2"]) == 2
    assert "PostgreSQL" in capsys.readouterr().err
    assert cli.main(["tune", str(path), "-P", "limit=100", "--no-final"]) == 2  # resuming with other settings
    assert "other settings" in capsys.readouterr().err
    assert cli.main(["tune", str(path), "-P", "lr=0.1"]) == 2
    assert "searched in the space" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"space": {"lr": {"type": "float", "low": 0.1}}}, "space.lr: needs `low` and `high`"),
    ({"space": {"batch_size": {"type": "float", "low": 8, "high": 64}}}, "batch_size is int"),
    ({"space": {"lr": {"type": "categorical", "choices": ["fast"]}}}, "space.lr: parameter lr='fast' is not a valid"),
    ({"space": {"nope": {"type": "categorical", "choices": [1]}}}, "unknown parameter 'nope'"),
    ({"fixed": {"epochs": "ten"}}, "fixed.epochs: parameter epochs='ten'"),
    ({"fixed": {"optimizer": "lion"}}, "optimizer must be one of"),
    ({"sampler": {"type": "grid"}}, "grid sampler needs categorical parameters; ['lr']"),
    ({"pruner": {"type": "median", "patience": 3}}, "pruner:"),
    ({"n_trails": 3}, "n_trails: unknown key; known: ['budget_images', 'enqueue', 'experiment', 'fixed'"),
    ({"budget_epochs": 30}, "budget_epochs: unknown key"),
    ({"fixed": {"lr": 0.1, "epochs": 3}}, "['lr'] both fixed and searched"),
    ({"budget_images": 1.5}, "budget_images: Input should be a valid integer, got 1.5"),
    ({"budget_images": -1}, "budget_images: Input should be greater than or equal to 0, got -1"),
    ({"space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "choices": [1]}}},
     "space.lr: unknown key(s) ['choices'] for type float"),
    ({"space": {"lr": {"type": "uniform", "low": 1e-4, "high": 1e-2}}}, "space.lr.type: Input should be 'float'"),
    ({"sampler": {"type": "cmaes"}}, "sampler: type must be one of ['grid', 'random', 'tpe'], got"),
    ({"enqueue": [{}]}, "enqueue[0]: Dictionary should have at least 1 item"),
    ({"pruner": {"type": "successive_halving"}}, "successive_halving needs min_resource, the epochs of its first rung, "
                                                  "an integer 1..2 (trials run 3 epochs), got None"),
    ({"pruner": {"type": "hyperband", "min_resource": 3}}, "an integer 1..2 (trials run 3 epochs), got 3"),
    ({"pruner": {"type": "successive_halving", "min_resource": 1, "reduction_factor": 1}}, "reduction_factor >= 2"),
    ({"sampler": {"type": "tpe", "group": True}}, "sampler: ``group`` option can only be enabled when"),
    ({"enqueue": {"lr": 1e-3}}, "enqueue: Input should be a valid list, got {'lr': 0.001}"),
    ({"enqueue": [{"dropout": 0.5}]}, "enqueue[0]: ['dropout'] not searched in `space` (['lr'])"),
    ({"enqueue": [{"lr": "1e-1"}]}, "enqueue[0].lr: 0.1 is outside the space (0.0001..0.01)"),
    ({"enqueue": [{"lr": "fast"}]}, "enqueue[0].lr: parameter lr='fast' is not a valid float"),
])
def test_bad_search_spaces_name_file_and_field(tmp_path, change, message):
    spec = {"space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            "fixed": {**SMALL, "epochs": 3}, **change}
    path = write_space(tmp_path, "broken", **spec)
    with pytest.raises(ValueError) as err:
        tuning.load_spec(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_shipped_search_spaces_load():
    root = Path(__file__).resolve().parents[1] / "tuning"
    specs = {p.stem: tuning.load_spec(p) for p in sorted(root.glob("*.yaml"))}
    assert set(specs) >= {"fer_cnn_grid", "fer_cnn", "fer_resnet18_freeze", "fmnist_cnn", "fer_best"}
    grid = specs["fer_cnn_grid"]
    assert grid["n_trials"] == 9 and grid["fixed"] == {"batch_size": 32, "optimizer": "adam", "epochs": 10}
    assert grid["space"]["lr"]["choices"] == [1e-2, 1e-3, 1e-4]
    search = specs["fer_cnn"]
    assert search["budget_images"] == 30 * 25_838 and search["sampler"]["seed"] == 0  # a third of 9 x 10 epochs
    preset = config.make_config("fer_cnn")
    assert {k: getattr(preset, k) for k in ("lr", "batch_size", "optimizer", "dropout")}.items() \
        <= search["enqueue"][0].items()  # the report's published setting is tried first
    assert set(specs["fer_resnet18_freeze"]["space"]["freeze"]["choices"]) == {
        "none", "conv1", "layer1", "layer2", "layer3", "layer4"}


@pytest.mark.slow
@pytest.mark.services
def test_workers_on_two_hosts_join_one_study_with_their_own_credentials_files(team_stack, fmnist_dir, tmp_path,
                                                                              monkeypatch):
    from cnnlab.stack.secrets import credentials, worker_environment

    homes = []
    for name in ("dave", "erin"):  # two hosts: a working folder and a credentials file each, nothing shared
        home = tmp_path / name
        home.mkdir()
        team_stack.add_user(name, worker=True, out=home / "team.env")
        assert {f.name: f.stat().st_mode & 0o777 for f in home.iterdir()} == {"team.env": 0o600, "team.pgpass": 0o600}
        write_space(home, "space", study_name="hosts", n_trials=4, fixed={"epochs": 3, "limit": 600},
                    space={"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
        homes.append(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PGPASS"))}  # only what the files say
    cmd = [sys.executable, "-m", "cnnlab", "tune", "space.yaml", "--credentials", "team.env", "--no-final",
           "-P", f"data_dir={fmnist_dir}"]
    assert not any("PASSWORD" in a or "@" in a for a in cmd)  # no password on a command line
    storage = team_stack.urls()["optuna_storage"]
    monkeypatch.setenv("PGPASSFILE", worker_environment(homes[0] / "team.env")["PGPASSFILE"])
    def start(home: Path) -> subprocess.Popen:
        with open(home / "tune.log", "w") as log:
            return subprocess.Popen(cmd, cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=log)
    first = start(homes[0])
    wait_for(lambda: trials_in(storage, "hosts"), 300, "the first worker's first trial")
    second = start(homes[1])
    for worker, home in zip((first, second), homes):
        assert worker.wait(timeout=600) == 0, (home / "tune.log").read_text()[-3000:]

    trials = optuna.load_study(study_name="hosts", storage=storage).get_trials()
    # each host stops after its running trial once the study is full: at most one extra trial per other host
    assert {t.state for t in trials} == {TrialState.COMPLETE} and len(trials) in (4, 5)
    mlflow.set_tracking_uri(team_stack.urls()["tracking_uri"])
    with credentials(homes[1] / "team.env"):
        runs = study_runs("hosts")
    assert len(runs["parent"]) == 1 and len(runs["trials"]) == len(trials)  # one study, in the team's server
    pids = {r.data.tags["worker"].split(":")[1] for r in runs["trials"]}
    assert pids == {str(first.pid), str(second.pid)}  # both hosts ran trials
