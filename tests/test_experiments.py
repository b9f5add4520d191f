"""Experiments end to end: what a run logs, resume after a crash, FAILED runs, every FER variant."""
from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cnnlab.tracking.experiments import make_config, run
from conftest import REPO
from crash import Crash, CrashAfter


def artifacts(run_id: str, path: str = "") -> set[str]:
    out = set()
    for item in MlflowClient().list_artifacts(run_id, path):
        out |= artifacts(run_id, item.path) if item.is_dir else {item.path}
    return out


def test_fmnist_run_logs_config_data_metrics_artifacts_and_model(fmnist_dir):
    cfg = make_config("fmnist_cnn", epochs=2, limit=400, permute=True, permute_seed=3, data_dir=str(fmnist_dir))
    result = run(cfg)
    r = mlflow.get_run(result["run_id"])
    assert r.info.status == "FINISHED"
    assert r.data.params["permute"] == "True" and r.data.params["epochs"] == "2" and r.data.params["seed"] == "0"
    assert {"git_commit", "dataset_digest", "config_digest"} <= set(r.data.tags)
    assert r.data.tags["config_digest"] == cfg.digest()
    history = MlflowClient().get_metric_history(r.info.run_id, "val_accuracy")
    assert sorted({m.step for m in history}) == [1, 2]  # the last again on the logged model, with its dataset
    assert r.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert 0.0 <= r.data.metrics["test_auc_shoes"] <= 1.0
    files = artifacts(r.info.run_id)
    for name in ("test_confusion_matrix.png", "test_roc.png", "test_classification_report.json",
                 "test_classification_report.txt", "val_confusion_matrix.png", "curves.png"):
        assert f"evaluation/{name}" in files
    assert {"permutation.json", "config.json", "data_summary.json"} <= files
    inputs = r.inputs.dataset_inputs
    assert {i.dataset.digest for i in inputs} >= {r.data.tags["dataset_digest"]}
    assert {t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context"} == {"train", "val", "test"}
    model = mlflow.pyfunc.load_model(f"runs:/{r.info.run_id}/model")
    assert model.metadata.signature is not None
    out = model.predict(make_fmnist_pixels(fmnist_dir))
    assert list(out[0])[:2] == ["label", "class_index"] and {o["label"] for o in out} <= {"clothes", "shoes", "others"}


def make_fmnist_pixels(fmnist_dir):
    from cnnlab.core.data import fmnist
    return fmnist.read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")[:5]


def test_interrupted_run_resumes_same_run_with_same_metrics(fmnist_dir):
    cfg = make_config("fmnist_cnn", epochs=3, limit=300, data_dir=str(fmnist_dir), log_model=False)
    reference = run(cfg)
    with pytest.raises(Crash):
        run(cfg, [CrashAfter(1)])
    crashed = MlflowClient().search_runs([mlflow.get_experiment_by_name("fmnist_cnn").experiment_id],
                                         "attributes.status = 'FAILED'")
    assert len(crashed) == 1 and "simulated crash" in crashed[0].data.tags["error"]
    resumed = run(cfg)
    assert resumed["run_id"] == crashed[0].info.run_id
    assert mlflow.get_run(resumed["run_id"]).info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(resumed["run_id"], "train_loss")] == [1, 2, 3]
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    assert resumed["test_macro_auc"] == pytest.approx(reference["test_macro_auc"], rel=1e-9)


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer": "lbfgs"}, "optimizer must be one of .* got 'lbfgs'"),
    ({"classes": 5}, "classes must be 3 or 10, got 5"),
    ({"freeze": "layer2"}, "applies to resnet18 only"),
])
def test_bad_parameter_fails_the_run_with_a_clear_error(fmnist_dir, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(make_config("fmnist_cnn", epochs=1, limit=100, data_dir=str(fmnist_dir), **overrides))
    (failed,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("fmnist_cnn").experiment_id])
    assert failed.info.status == "FAILED" and "error" in failed.data.tags


def test_unknown_parameter_name():
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['colour'\]"):
        make_config("fer_cnn", colour="red")


@pytest.mark.parametrize("experiment, overrides", [
    ("fer_cnn", {"variant": "model1"}),
    ("fer_cnn", {"variant": "model2", "optimizer": "sgd"}),
    ("fer_cnn", {"variant": "model2", "optimizer": "rmsprop", "weight_decay": 1e-4}),
    ("fer_resnet18", {"weights": "none", "in_chans": 1}),
    ("fer_resnet18", {"freeze": "layer3", "unfreeze_epochs": 1, "image_size": 64}),
    ("fer_best", {"width": 8, "mixup": 0.2, "tta": "tencrop"}),
    ("fer_best", {"width": 8, "cutmix": 1.0, "tta": "flip", "optimizer": "adamw", "schedule": "plateau"}),
])
def test_fer_variants_train_and_log(fer_subset, experiment, overrides):
    cfg = make_config(experiment, epochs=1, limit=140, batch_size=32, data_dir=str(fer_subset), **overrides)
    result = run(cfg)
    r = mlflow.get_run(result["run_id"])
    assert r.info.status == "FINISHED"
    assert len({m.step for m in MlflowClient().get_metric_history(r.info.run_id, "val_accuracy")}) == cfg.total_epochs()
    assert "test_auc_happy" in r.data.metrics and "val_f1_neutral" in r.data.metrics
    files = artifacts(r.info.run_id)
    assert {"evaluation/test_confusion_matrix.png", "evaluation/val_roc.png"} <= files
    if cfg.tta != "none":
        assert "test_tta_accuracy" in r.data.metrics


@pytest.mark.slow
def test_mlflow_run_entry_points_end_to_end(fmnist_dir, tmp_path):
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")

    def mlflow_run(*args: str) -> None:
        proc = subprocess.run(["mlflow", "run", str(REPO), "--env-manager", "local", *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    mlflow_run("-e", "fmnist_cnn", "-P", "epochs=1", "-P", "limit=300", "-P", "classes=10",
               "-P", f"data_dir={fmnist_dir}")
    (r,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("Default").experiment_id])
    assert r.info.status == "FINISHED" and r.data.params["classes"] == "10"
    assert r.info.run_name == "fmnist_cnn epochs=1 classes=10 limit=300"  # not MLflow's random name
    assert "test_accuracy" in r.data.metrics and "test_auc_bag" in r.data.metrics
    assert mlflow.pyfunc.load_model(f"runs:/{r.info.run_id}/model").metadata.signature is not None

    # a study's parent run and its trials share one experiment, with or without --experiment-name
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump({"experiment": "fmnist_mlp", "n_trials": 2, "sampler": {"type": "grid"},
                                     "fixed": {"epochs": 1, "limit": 100, "data_dir": str(fmnist_dir)},
                                     "space": {"lr": {"type": "categorical", "choices": [1e-3, 3e-3]}}}))
    for experiment in ("", "studies"):
        mlflow_run("-e", "tune", "-P", f"space={space}", "-P", f"study_name=tiny{experiment}", "-P", "final=false",
                   "-P", f"storage=sqlite:///{tmp_path / 'optuna.db'}",
                   *(["--experiment-name", experiment] if experiment else []))
        runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.study = 'tiny{experiment}'",
                                  output_format="list")
        (parent,) = [r for r in runs if r.data.tags.get("tuning") == "study"]
        assert parent.info.run_name == f"tiny{experiment}" and len(runs) == 3
        assert {mlflow.get_experiment(r.info.experiment_id).name for r in runs} == {experiment or "Default"}
        assert {r.data.tags.get("mlflow.parentRunId") for r in runs if r is not parent} == {parent.info.run_id}


@pytest.mark.slow
def test_cli_bad_value_exits_nonzero_and_run_is_failed(fmnist_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cnnlab", "train", "fmnist_cnn", "-P", "classes=4",
                           "-P", f"data_dir={fmnist_dir}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2 and "classes must be 3 or 10, got 4" in proc.stderr
    (r,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("fmnist_cnn").experiment_id])
    assert r.info.status == "FAILED"
    bad_type = subprocess.run([sys.executable, "-m", "cnnlab", "train", "fmnist_cnn", "-P", "epochs=ten"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad_type.returncode == 2 and "epochs='ten' is not a valid int" in bad_type.stderr
