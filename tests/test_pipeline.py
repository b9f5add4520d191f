"""The MLflow-free pipeline: a dataset, a model and an experiment added in this one file (color images), no
validation split, and checkpoints that only the same config on the same data resumes."""
from __future__ import annotations

import dataclasses
import hashlib
import logging

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from cnnlab.core import calibration, config, models, pipeline
from cnnlab.tracking import experiments
from cnnlab.core.augment import batch_augment, random_affine
from cnnlab.core.data import Split, register_dataset
from cnnlab.core.preprocess import Preprocess
from cnnlab.core.training import Checkpoint, TrainConfig, fit
from crash import Crash, CrashAfter
from payload import Payload
from support import run_pipeline
from test_data import make_fmnist

COLORS = ["red", "green", "blue"]


@register_dataset("toy_rgb", title="toy RGB", size=16, channels=3)
def load_toy_rgb(data_dir: str | None) -> tuple[Split, Split]:
    """Dim noise with a bright blob in the channel of the class's color: learnable only from color."""
    rng, blob = np.random.default_rng(0), 6
    splits = []
    for name, n in (("train", 600), ("test", 150)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 90, (n, 3, 16, 16), dtype=np.uint8)
        for i, label in enumerate(labels):
            top, left = rng.integers(0, 16 - blob, 2)
            images[i, label, top: top + blob, left: left + blob] = 230
        digest = hashlib.sha256(images.tobytes()).hexdigest()[:16]
        splits.append(Split(torch.from_numpy(images), torch.from_numpy(labels), COLORS, digest, name,
                            {"source": __file__}))
    return splits[0], splits[1]


@models.register
def toy_net(num_classes: int = 3, in_chans: int = 3, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(8, num_classes))


@pytest.fixture
def toy_experiment(monkeypatch):
    preset = config.Preset("colored blobs", dict(dataset="toy_rgb", model="toy_net", in_chans=3, epochs=3,
                                                 batch_size=32, lr=1e-2, dropout=0.0, augment="flip", tta="flip"), ())
    monkeypatch.setitem(config.PRESETS, "toy_rgb", preset)
    return "toy_rgb"


def test_a_color_dataset_and_model_defined_here_train_and_evaluate(toy_experiment, tmp_path):
    trained = run_pipeline(config.make_config(toy_experiment), tmp_path / "eval")
    assert [len(trained.splits[k]) for k in ("train", "val", "test")] == [540, 60, 150]
    pre = trained.model.preprocess
    assert pre.config()["image_channels"] == 3 and len(pre.mean) == 3 and pre.channels == 3
    assert trained.model(trained.splits["test"].images[:4]).shape == (4, 3)
    for view in ("val", "val_tta", "test", "test_tta"):
        probs = trained.probabilities[view]
        assert probs.shape == (len(trained.splits[view.split("_")[0]]), 3)
        assert np.allclose(probs.sum(1), 1, atol=1e-3)
    test_preds, test_labels = trained.probabilities["test"].argmax(1), trained.splits["test"].labels.numpy()
    assert trained.metrics["test_accuracy"] == pytest.approx((test_preds == test_labels).mean())
    assert trained.metrics["test_accuracy"] > 0.8  # chance is 1/3: color reaches the net through every step
    assert len(trained.history) == 3 and "val_accuracy" in trained.history[-1]
    written = {p.name for p in (tmp_path / "eval").iterdir()}
    assert {"test_confusion_matrix.png", "test_tta_roc.png", "curves.png"} <= written
    # temperature: fitted on val (it minimises val NLL), applied to test's metrics and stored for serving
    t, val = trained.temperature, trained.splits["val"].labels.numpy()
    assert t > 0 and trained.metrics["temperature"] == t and trained.bundle()["temperature"] == t
    nll = [calibration.nll(calibration.calibrate(trained.probabilities["val"], k), val) for k in (t * 0.8, t, t * 1.25)]
    assert nll[1] <= min(nll[0], nll[2])
    assert trained.metrics["test_ece_calibrated"] == pytest.approx(calibration.expected_calibration_error(
        calibration.calibrate(trained.probabilities["test"], t), test_labels))


def test_the_color_experiment_as_a_tracked_run(toy_experiment):
    cfg = config.make_config(toy_experiment, epochs=1, augment="standard", cutmix=1.0, log_model=False)
    result = experiments.run(cfg)
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["dataset"] == "toy_rgb"
    assert run.data.metrics["test_tta_accuracy"] == pytest.approx(result["test_tta_accuracy"])
    assert run.data.params["preprocess_mean"].startswith("[")  # one mean per color channel
    assert run.data.params["model.num_classes"] == "3"  # the factory's arguments that no config field holds
    with pytest.raises(ValueError, match="toy_rgb has 3-channel images: in_chans must be 3, got 1"):
        config.make_config(toy_experiment, in_chans=1).validate()


def test_color_batches_keep_their_channels_through_augmentation():
    x, y = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8), torch.arange(8) % 3
    same = random_affine(x, torch.Generator().manual_seed(0), flip=False, max_shift=0, max_deg=0, scale=(1, 1))
    assert torch.allclose(same, x.float() / 255, atol=1e-5)
    cfg = config.make_config("fer_best", mixup=0.4)
    out, target = batch_augment(cfg, num_classes=3)(x, y, torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 20, 20) and target.shape == (8, 3)  # classes from the data, not cfg.classes


def test_preprocess_normalizes_each_color_channel_and_reads_old_gray_configs():
    pre = Preprocess(mean=[0.2, 0.4, 0.6], std=[0.1, 0.2, 0.3], size=4, channels=3, image_channels=3)
    pixels = torch.tensor([51, 102, 153], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(pre(pixels), torch.zeros(2, 3, 4, 4), atol=1e-6)
    old = Preprocess(**{"mean": 0.5, "std": 0.25, "size": 28, "channels": 1})  # a bundle from before image_channels
    assert old.config()["image_channels"] == 1
    assert old(torch.zeros(1, 28, 28, dtype=torch.uint8)).shape == (1, 1, 28, 28)


def test_no_validation_split_trains_on_all_of_train_and_evaluates_test(toy_experiment, tmp_path):
    trained = run_pipeline(config.make_config(toy_experiment, epochs=1, val_fraction=0), tmp_path)
    assert set(trained.splits) == {"train", "test"} and len(trained.splits["train"]) == 600
    assert not any(k.startswith("val") for k in [*trained.history[0], *trained.metrics, *trained.probabilities])
    result = experiments.run(config.make_config(toy_experiment, epochs=1, val_fraction=0, log_model=False))
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert not any(k.startswith("val") for k in run.data.metrics)
    with pytest.raises(ValueError, match="schedule=plateau relies on validation accuracy"):
        config.make_config(toy_experiment, val_fraction=0, schedule="plateau").validate()


def test_a_checkpoint_of_other_settings_or_corrupt_is_discarded(toy_experiment, tmp_path, caplog):
    trained = pipeline.prepare(config.make_config(toy_experiment, epochs=1))
    cfg, split = TrainConfig(epochs=1, batch_size=64, device="cpu"), trained.splits["train"]
    fit(trained.model, split, None, cfg, callbacks=[Checkpoint(tmp_path / "a.pt", {"dataset_digest": "A"})])
    other = Checkpoint(tmp_path / "a.pt", {"dataset_digest": "B"})
    with caplog.at_level(logging.WARNING, logger="cnnlab.core.training"):
        assert other.load() is None
        assert not other.path.exists() and "belongs to {'dataset_digest': 'A'}" in caplog.text
        other.path.write_bytes(b"half a checkpoint")
        history = fit(trained.model, split, None, TrainConfig(epochs=2, batch_size=64, device="cpu"), callbacks=[other])
    assert "unreadable" in caplog.text and len(history) == 2  # discarded, then both epochs from the start


def test_a_checkpoint_that_needs_code_to_load_is_discarded_unrun(toy_experiment, tmp_path, caplog):
    """Checkpoints load as weights only: one holding a pickled object (its key right) is discarded, the object never
    runs, and training starts afresh."""
    trained = pipeline.prepare(config.make_config(toy_experiment, epochs=1))
    cfg, split = TrainConfig(epochs=1, batch_size=64, device="cpu"), trained.splits["train"]
    checkpoint = Checkpoint(tmp_path / "a.pt", {"dataset_digest": "A"})
    fit(trained.model, split, None, cfg, callbacks=[checkpoint])
    assert checkpoint.load() is not None  # what the loop saves loads as weights only
    marker = tmp_path / "ran"
    torch.save({**torch.load(checkpoint.path, weights_only=True), "extra": Payload(marker)}, checkpoint.path)
    with caplog.at_level(logging.WARNING, logger="cnnlab.core.training"):
        history = fit(trained.model, split, None, TrainConfig(epochs=2, batch_size=64, device="cpu"),
                      callbacks=[checkpoint])
    assert "unreadable" in caplog.text and "Weights only load failed" in caplog.text and len(history) == 2
    assert not marker.exists()


def test_a_run_on_changed_data_never_resumes_the_old_checkpoint(fmnist_dir, tmp_path, caplog):
    cfg = config.make_config("fmnist_cnn", epochs=2, limit=200, data_dir=str(fmnist_dir), log_model=False)
    with pytest.raises(Crash):
        experiments.run(cfg, [CrashAfter(0)])
    (crashed,) = mlflow.search_runs(experiment_names=["fmnist_cnn"], output_format="list")
    other_data = tmp_path / "other"  # same config (data_dir is not part of it), other files
    other_data.mkdir()
    make_fmnist(other_data, n_train=400, n_test=100)
    with caplog.at_level(logging.WARNING, logger="cnnlab.core.training"):
        result = experiments.run(dataclasses.replace(cfg, data_dir=str(other_data)))
    assert "discarding checkpoint" in caplog.text and crashed.data.tags["dataset_digest"] in caplog.text
    assert result["run_id"] != crashed.info.run_id
    assert mlflow.get_run(crashed.info.run_id).info.status == "FAILED"
    assert [m.step for m in MlflowClient().get_metric_history(result["run_id"], "train_loss")] == [1, 2]


def test_a_corrupt_checkpoint_does_not_trap_reruns(fmnist_dir, caplog):
    cfg = config.make_config("fmnist_cnn", epochs=2, limit=200, data_dir=str(fmnist_dir), log_model=False)
    with pytest.raises(Crash):
        experiments.run(cfg, [CrashAfter(0)])
    (last,) = experiments.CHECKPOINT_ROOT.glob("*/last.pt")
    last.write_bytes(last.read_bytes()[:1000])  # a disk filled up mid-write, say
    with caplog.at_level(logging.WARNING, logger="cnnlab.core.training"):
        result = experiments.run(cfg)
    assert "unreadable" in caplog.text and mlflow.get_run(result["run_id"]).info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(result["run_id"], "train_loss")] == [1, 2]
