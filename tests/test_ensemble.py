"""Several runs as one model (an ensemble: tracked, registered, served), one network distilled from a teacher, and
test-time augmentation as a model-level function that serving can call."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

from cnnlab import cli
from cnnlab.core import config, models, pipeline
from cnnlab.tracking import experiments, registry, runs as tracking
from cnnlab.serving.model import CnnlabModel
from cnnlab.core.training import predict
from support import run_pipeline, tta_probabilities
from conftest import REPO


def tiny_fer(fer_subset, **overrides) -> config.Config:
    """fer_best shrunk to seconds: width 8, one epoch on a few hundred real FER2013 images, fp32."""
    settings = dict(data_dir=str(fer_subset), width=8, epochs=1, batch_size=64, tta="flip", precision="fp32")
    return config.make_config("fer_best", **{**settings, **overrides})


def served_probs(model: CnnlabModel, images: np.ndarray) -> np.ndarray:
    """The served model's raw probabilities (each member and the ensemble fit their own temperature)."""
    records = model.predict(None, images, params={"calibrated": False})
    return np.array([[r[f"prob_{c}"] for c in model.classes] for r in records], dtype=np.float64)


def test_runs_as_one_tracked_registered_model_that_averages_their_probabilities(fer_subset, monkeypatch, tmp_path):
    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "fp32")
    monkeypatch.setenv("CNNLAB_SERVING_RUNTIME", "torch")  # members carry ONNX int8 files: compare torch with torch
    members = [experiments.run(tiny_fer(fer_subset, seed=seed, split_seed=0))["run_id"] for seed in (0, 1)]
    result = experiments.ensemble(members, overrides={"tta": "tencrop"})
    assert result["name"] == "fer_best_ensemble" and result["members"] == members
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "ensemble"
    assert run.data.tags["members"] == ",".join(members) and run.data.params["members"] == "2"

    test = pipeline.load_data(tiny_fer(fer_subset, split_seed=0))["test"]
    bundles = [tracking.load_bundle(m) for m in members]
    mean = sum(predict(models.from_bundle(b), test.images, precision="fp32") for b in bundles).numpy() / 2
    ensemble_bundle = tracking.load_bundle(result["run_id"])
    ensemble = models.from_bundle(ensemble_bundle)
    assert np.allclose(predict(ensemble, test.images, precision="fp32").numpy(), mean, atol=1e-6)
    labels = test.labels.numpy()
    assert run.data.metrics["test_accuracy"] == pytest.approx((mean.argmax(1) == labels).mean())
    assert {"val_accuracy", "test_tta_accuracy", "test_tta_ece"} <= set(run.data.metrics)  # the evaluation of any run
    on_model = {m.key for m in tracking.logged_model(run).metrics if m.dataset_name}  # as any run's logged model
    assert {"val_accuracy", "test_accuracy", "test_tta_accuracy"} <= on_model

    assert registry.register("fer_best_ensemble")["alias"] == "champion"  # like any run
    served = mlflow.pyfunc.load_model("models:/fer_best_ensemble@champion").unwrap_python_model()
    served_members = [mlflow.pyfunc.load_model(f"runs:/{m}/model").unwrap_python_model() for m in members]
    pixels = test.images.numpy()
    expected = sum(served_probs(m, pixels) for m in served_members) / 2
    assert np.allclose(served_probs(served, pixels), expected, atol=1e-5)
    assert np.allclose(expected, mean, atol=1e-5)

    monkeypatch.setenv("CNNLAB_SERVING_PRECISION", "bf16")  # weights cast once, as served on AMX CPUs
    torch.save(ensemble_bundle, tmp_path / "ensemble.pt")
    assert np.allclose(served_probs(CnnlabModel.from_bundle_file(tmp_path / "ensemble.pt"), pixels), mean, atol=0.03)

    other_split = experiments.run(tiny_fer(fer_subset, seed=2, log_model=True))["run_id"]  # split_seed -1: seed 2
    with pytest.raises(ValueError, match=r"trained on different splits: run .* in \{'split seed': \(0, 2\)\}"):
        experiments.ensemble([members[0], other_split])


def agreement(model, other, images) -> float:
    a, b = (predict(m, images, precision="fp32").argmax(1) for m in (model, other))
    return (a == b).float().mean().item()


def test_a_student_distilled_from_a_teacher_learns_its_predictions_and_records_it(fmnist_dir):
    small = dict(data_dir=str(fmnist_dir), limit=400, batch_size=32, precision="fp32")
    teacher_run = experiments.run(config.make_config("fmnist_cnn", epochs=2, **small))["run_id"]
    cfg = config.make_config("fmnist_cnn", epochs=3, seed=1, teacher=teacher_run, distill_alpha=1.0,
                             distill_temperature=2.0, **small)
    result = experiments.run(cfg)
    run = mlflow.get_run(result["run_id"])
    teacher_bundle = tracking.load_bundle(teacher_run)
    assert run.data.tags["teacher_runs"] == teacher_run and run.data.tags["teacher_members"] == "1"
    assert run.data.tags["teacher_digest"] == models.bundle_digest(teacher_bundle)
    losses = [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(result["run_id"], "train_loss"),
                                      key=lambda m: m.step)]
    assert losses[-1] < 0.7 * losses[0]  # alpha=1: the loss is the KL to the teacher alone, and it falls

    teacher, student = models.from_bundle(teacher_bundle), models.from_bundle(tracking.load_bundle(result["run_id"]))
    untrained = pipeline.prepare(dataclasses.replace(cfg, teacher="")).model  # the student's initial weights
    test = pipeline.load_data(cfg)["test"].images
    assert agreement(student, teacher, test) > agreement(untrained, teacher, test) + 0.2
    assert models.count_parameters(student) == models.count_parameters(teacher)  # one network: single-model cost


def test_an_ensemble_teacher_is_named_by_its_members(fer_subset, tmp_path):
    members = []
    for seed in (0, 1):
        trained = run_pipeline(tiny_fer(fer_subset, seed=seed, split_seed=0), tmp_path / str(seed))
        torch.save(trained.bundle(), tmp_path / f"m{seed}.pt")
        members.append(str(tmp_path / f"m{seed}.pt"))
    student = pipeline.prepare(tiny_fer(fer_subset, teacher=",".join(members)))
    assert isinstance(student.teacher.net, models.MemberAverage) and len(student.teacher.net.members) == 2
    assert student.tags["teacher_runs"] == ",".join(members) and student.tags["teacher_members"] == "2"
    history = pipeline.train(student)
    assert np.isfinite(history[-1]["train_loss"]) and not student.teacher.training
    with pytest.raises(ValueError, match="teacher .* predicts classes"):
        pipeline.load_teacher(members, models.read_bundle, ["a", "b"])


@pytest.mark.parametrize("tta", ["flip", "tencrop"])
def test_the_serving_tta_function_equals_the_pipelines_tta_evaluation(fer_subset, tmp_path, tta):
    trained = run_pipeline(tiny_fer(fer_subset, tta=tta, epochs=3), tmp_path)
    images = trained.splits["test"].images
    with torch.no_grad():
        served = tta_probabilities(trained.model.eval().cpu(), images, tta).numpy()
        plain = tta_probabilities(trained.model, images).numpy()
    assert np.allclose(served, trained.probabilities["test_tta"], atol=1e-5)
    assert np.allclose(plain, trained.probabilities["test"], atol=1e-5)
    assert np.abs(served - plain).max() > 1e-3  # the views change the answer: the comparison means something
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_probabilities(trained.model, images, "fivecrop")


@pytest.mark.slow
def test_the_gpu_job_file_runs_its_ensemble_and_student_after_their_members(fer_subset, tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_fer_best_long.yaml as the GPU call runs it (benchmarks/gpu/runner.py), shrunk (--quick, width
    8): the members train, the ensemble of their models and the student of the ensemble run after them, each in its
    own store, and everything comes back into one store once."""
    jobs = "ema_s0,ema_s1,ema_s2,ensemble3,distilled"
    env = {k: v for k, v in os.environ.items() if k not in ("FER2013_DIR", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "runner.py"),
                           str(REPO / "benchmarks" / "gpu_fer_best_long.yaml"), "--only", jobs, "--quick",
                           "-P", f"data_dir={fer_subset}", "-P", "width=8", "--parallel", "2", "--threads", "1",
                           "--out", str(tmp_path / "out"), "--root", str(tmp_path / "run"), "--deadline", "1200"],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert cli.main(["runs", "import", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 5  # the copies the later jobs read do not come back
    client = mlflow.MlflowClient()
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    runs = {r.data.tags["gpu_job"]: r for r in found}
    assert sorted(runs) == sorted(jobs.split(",")) and all(r.info.status == "FINISHED" for r in found)
    ensemble, student = runs["ensemble3"].data, runs["distilled"].data
    assert ensemble.tags["model"] == "ensemble" and ensemble.params["members"] == "3"
    assert "test_tta_accuracy" in ensemble.metrics and ensemble.params["tta"] == "tencrop"
    assert student.tags["teacher_members"] == "3" and student.params["epochs"] == "1"  # --quick over the job's 60
    assert {"val_accuracy_raw", "test_tta_accuracy_raw"} <= set(runs["ema_s0"].data.metrics)
