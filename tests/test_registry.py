"""Registry: best FINISHED run -> new version; champion moves only when significantly better on the same validation
images (McNemar), or with force."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cnnlab import cli
from cnnlab.core import evaluation, models
from cnnlab.tracking import registry, runs as tracking
from cnnlab.core.preprocess import Classifier, Preprocess

SPEC = {"name": "mlp", "num_classes": 3, "image_size": 28, "hidden": 8}


def logged_run(val: float, digest: str = "d1", experiment: str = "fmnist_cnn", status: str = "FINISHED",
               model: bool = True, correct: np.ndarray | None = None, shift: int = 0, **tags) -> str:
    """A run as experiments.run leaves it: metrics, tags and a real cnnlab pyfunc model (a tiny untrained MLP);
    with `correct` (one bool per image), its val and test predictions files (`shift`: other val images)."""
    tracking.init_tracking(experiment)
    with mlflow.start_run() as run:
        if correct is not None:
            labels = np.arange(len(correct)) % 3
            probs = np.eye(3)[np.where(correct, labels, (labels + 1) % 3)]
            with tempfile.TemporaryDirectory() as tmp:
                evaluation.write_predictions(Path(tmp) / "test_predictions.csv", probs, labels, ["a", "b", "c"])
                evaluation.write_predictions(Path(tmp) / "val_predictions.csv", probs, (labels + shift) % 3,
                                             ["a", "b", "c"])
                mlflow.log_artifacts(tmp, "evaluation")
        mlflow.set_tags({"experiment": experiment, "dataset_digest": digest, "git_commit": "c0ffee", **tags})
        mlflow.log_metrics({"val_accuracy": val, "test_accuracy": val - 0.01, "test_macro_f1": val - 0.02,
                            "test_auc_a": 0.9, "test_f1_b": 0.8})
        if model:
            net = Classifier(Preprocess(0.3, 0.3, 28), models.create(**SPEC))
            tracking.log_bundle(models.bundle(net, SPEC, ["a", "b", "c"]), np.zeros((2, 28, 28), np.uint8))
        if status != "FINISHED":
            mlflow.end_run(status)
    return run.info.run_id


def aliases(name: str) -> dict[str, str]:
    """alias -> source run of the version it points at."""
    model = MlflowClient().get_registered_model(name)
    return {a: MlflowClient().get_model_version(name, v).tags["source_run"] for a, v in model.aliases.items()}


def test_champion_moves_only_on_improvement():
    rng = np.random.default_rng(1)
    base = rng.random(2000) < 0.60
    first = logged_run(0.60, correct=base)
    result = registry.register("fmnist_cnn")
    assert (result["alias"], result["version"], result["registered"]) == ("champion", 1, True)
    version = MlflowClient().get_model_version("fmnist_cnn", "1")
    assert version.tags["source_run"] == first and version.tags["dataset_digest"] == "d1"
    assert version.tags["git_commit"] == "c0ffee" and float(version.tags["test_accuracy"]) == pytest.approx(0.59)
    assert float(version.tags["val_accuracy"]) == pytest.approx(0.60) and "test_macro_f1" in version.tags
    assert set(version.tags) == {"val_accuracy", "test_accuracy", "test_macro_f1", "dataset_digest", "source_run",
                                 "git_commit"}  # a few to scan; every metric stays on the logged model
    assert "significance" not in result  # nothing to compare with

    registry.register("fmnist_cnn")  # the same best run again: no new version
    assert len(MlflowClient().search_model_versions("name = 'fmnist_cnn'")) == 1

    worse = logged_run(0.70, status="FAILED")  # a failed run never counts, however good
    assert registry.register("fmnist_cnn")["registered"] is False
    assert worse not in aliases("fmnist_cnn").values()

    better = logged_run(0.65, correct=base | (rng.random(2000) < 0.25))
    result = registry.register("fmnist_cnn")
    assert (result["alias"], result["version"]) == ("champion", 2)
    assert result["reason"].startswith("challenger is significantly better than the champion on val")
    assert aliases("fmnist_cnn") == {"champion": better}

    other_data = logged_run(0.90, digest="d2", correct=np.ones(2000, bool))  # better, but on other data
    result = registry.register("fmnist_cnn")
    assert result["alias"] == "challenger" and "not comparable" in result["reason"]
    assert aliases("fmnist_cnn") == {"champion": better, "challenger": other_data}


def test_tie_is_not_an_improvement_and_rerun_says_so():
    correct = np.random.default_rng(2).random(500) < 0.5
    logged_run(0.5, correct=correct)
    registry.register("fmnist_cnn")
    tie = logged_run(0.5, correct=correct)
    MlflowClient().delete_run(registry.best_run("fmnist_cnn")[0].info.run_id)  # leave the tie as the best run
    result = registry.register("fmnist_cnn")
    assert result["run_id"] == tie and result["alias"] == "challenger"
    assert "not significantly better" in result["reason"]
    again = registry.register("fmnist_cnn")
    assert again["registered"] is False and "already registered as fmnist_cnn v2" in again["reason"]


def test_study_final_run_wins_over_better_trials():
    logged_run(0.9, study="s1")  # a trial: better, but not the study's final run
    final = logged_run(0.7, study="s1", final="true")
    logged_run(0.99, study="s2", final="true")
    result = registry.register(study="s1")
    assert result["run_id"] == final and result["name"] == "fmnist_cnn" and result["alias"] == "champion"


def test_no_candidate_is_a_clear_error():
    logged_run(0.8, model=False)
    with pytest.raises(ValueError, match="no FINISHED run with val_accuracy and a logged model for experiment 'fmnist"):
        registry.register("fmnist_cnn")
    with pytest.raises(ValueError, match="no FINISHED run with val_accuracy and a logged model for experiment 'nope'"):
        registry.register("nope")


def test_cli_register(capsys):
    run = logged_run(0.4)
    assert cli.main(["register", "fmnist_cnn", "--name", "custom"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["name"], out["run_id"], out["alias"]) == ("custom", run, "champion")
    assert out["uri"] == "models:/custom@champion"
    assert cli.main(["register", "nope"]) == 2
    assert "for experiment 'nope'" in capsys.readouterr().err


def test_register_says_whether_the_challenger_is_significantly_better():
    rng = np.random.default_rng(0)
    base = rng.random(2000) < 0.60
    logged_run(0.60, correct=base)
    registry.register("fmnist_cnn")
    much = base | (rng.random(2000) < 0.25)  # fixes ~10% of the images, breaks none
    logged_run(0.70, correct=much)
    result = registry.register("fmnist_cnn")
    assert result["alias"] == "champion"
    assert result["significance"].startswith("challenger is significantly better than the champion")
    assert MlflowClient().get_model_version("fmnist_cnn", result["version"]).tags["significance"] == \
        result["significance"]
    flips = rng.random(2000) < 0.01  # 1% of the images change, either way: noise
    noise = logged_run(0.71, correct=much ^ flips)  # a higher val_accuracy, but not significantly better
    result = registry.register("fmnist_cnn")
    assert result["significance"].startswith("challenger is not significantly better than the champion on val")
    assert result["alias"] == "challenger" and result["reason"] == result["significance"]
    assert aliases("fmnist_cnn")["challenger"] == noise
    logged_run(0.72, correct=np.ones(50, bool))
    result = registry.register("fmnist_cnn")
    assert "not compared with champion" in result["significance"] and "50 images" in result["significance"]
    assert result["alias"] == "challenger"
    logged_run(0.73, correct=np.ones(2000, bool), shift=1)  # other validation images: not comparable
    result = registry.register("fmnist_cnn")
    assert result["alias"] == "challenger" and "true label differs" in result["significance"]


def test_force_makes_a_champion_and_says_so(capsys):
    correct = np.random.default_rng(3).random(500) < 0.5
    logged_run(0.5, correct=correct)
    registry.register("fmnist_cnn")
    forced = logged_run(0.6, correct=correct)
    assert cli.main(["register", "fmnist_cnn", "--force"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["alias"] == "champion" and out["reason"].startswith("forced (--force) over champion v1; challenger "
                                                                  "is not significantly better")
    assert aliases("fmnist_cnn") == {"champion": forced}
    challenger = logged_run(0.7, correct=correct)
    assert cli.main(["register", "fmnist_cnn", "--force", "false"]) == 0  # as MLproject's default passes it
    assert json.loads(capsys.readouterr().out)["alias"] == "challenger"
    assert aliases("fmnist_cnn") == {"champion": forced, "challenger": challenger}
