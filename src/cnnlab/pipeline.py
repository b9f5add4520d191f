"""One experiment without MLflow: config -> data and model -> the one loop -> metrics, artifacts and probabilities,
plain and test-time augmented. experiments.run adds tracking around it; the benchmarks call it directly."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import data, models
from .augment import batch_augment, tta_views
from .config import Config
from .data import Split
from .evaluation import metrics_and_artifacts, plot_curves
from .preprocess import Classifier, Preprocess, pixel_stats
from .training import Checkpoint, fit, predict


@dataclass
class Trained:
    """One experiment's config, data and model; training fills in the history, evaluation metrics and probabilities."""
    cfg: Config
    splits: dict[str, Split]  # train, val (absent when val_fraction is 0), test
    model: Classifier
    spec: dict  # the model factory's arguments: models.create(**spec)
    history: list[dict] = field(default_factory=list)  # per epoch: train and val loss and accuracy, lr, images/s
    metrics: dict[str, float] = field(default_factory=dict)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # (N, classes) per view: val, test, test_tta...

    @property
    def classes(self) -> list[str]:
        return self.splits["train"].classes


def load_data(cfg: Config) -> dict[str, Split]:
    """The config's train / val / test splits; decoding is cached, so a second call is cheap."""
    options = data.get(cfg.dataset).options_from(cfg)
    return data.load_splits(cfg.dataset, cfg.data_dir or None, cfg.val_fraction, cfg.seed, cfg.limit, **options)


def data_records(cfg: Config) -> dict[str, object]:
    """JSON files that describe the data beyond its digest (e.g. a pixel permutation), by file name."""
    dataset = data.get(cfg.dataset)
    return dataset.records(**dataset.options_from(cfg)) if dataset.records else {}


def model_spec(cfg: Config, num_classes: int, image_size: int) -> dict:
    """The model factory's arguments, taken from the config by the factory's own parameter names."""
    params = inspect.signature(models._REGISTRY[cfg.model]).parameters
    values = {**dataclasses.asdict(cfg), "num_classes": num_classes, "image_size": image_size}
    return {"name": cfg.model, **{k: values[k] for k in params if k in values}}


def build(cfg: Config, train: Split) -> tuple[Classifier, dict]:
    """The network with its preprocessing (normalized by the training split's pixel statistics) and its spec."""
    torch.manual_seed(cfg.seed)  # initial weights depend on the seed alone
    image_size = cfg.image_size or train.images.shape[-1]
    mean, std = pixel_stats(train.images)
    spec = model_spec(cfg, len(train.classes), image_size)
    preprocess = Preprocess(mean, std, image_size, cfg.in_chans, image_channels=train.channels)
    return Classifier(preprocess, models.create(**spec)), spec


def freeze_schedule(cfg: Config) -> Callable | None:
    if cfg.freeze == "none":
        return None

    def hook(epoch: int, model: Classifier) -> None:
        models.freeze_resnet(model.net, cfg.freeze if epoch < cfg.epochs else "none")
    return hook


def checkpoint(cfg: Config, splits: dict[str, Split], path: Path) -> Checkpoint:
    """A checkpoint that only this config on this data resumes from."""
    return Checkpoint(path, {"config_digest": cfg.digest(), "dataset_digest": splits["train"].digest})


def prepare(cfg: Config) -> Trained:
    cfg.validate()
    splits = load_data(cfg)
    model, spec = build(cfg, splits["train"])
    return Trained(cfg, splits, model, spec)


def train(trained: Trained, on_epoch_end: Callable[[int, dict], None] | None = None,
          checkpoint_path: Path | None = None) -> list[dict]:
    """The loop over all epochs (with the unfreezing ones), the config's augmentation and freezing schedule."""
    cfg, splits = trained.cfg, trained.splits
    trained.history = fit(trained.model, splits["train"], splits.get("val"),
                          dataclasses.replace(cfg, epochs=cfg.total_epochs()),
                          augment=batch_augment(cfg, len(trained.classes)), epoch_hook=freeze_schedule(cfg),
                          on_epoch_end=on_epoch_end,
                          checkpoint=checkpoint(cfg, splits, checkpoint_path) if checkpoint_path else None)
    return trained.history


def evaluate(trained: Trained, out_dir: Path) -> dict[str, float]:
    """Metrics and artifact files (in out_dir) of val and test (test unless eval_test is off), each plain and with
    the config's TTA views; the probabilities stay in `trained`. Also training throughput and time."""
    cfg = trained.cfg
    views = {"": None, "_tta": tta_views(cfg.tta)} if cfg.tta != "none" else {"": None}
    names = [n for n in ("val", "test") if n in trained.splits and (n == "val" or cfg.eval_test)]
    for name in names:
        split = trained.splits[name]
        for suffix, transform in views.items():
            probs = predict(trained.model, split.images, cfg.eval_batch_size, cfg.device, cfg.precision, transform)
            trained.probabilities[name + suffix] = probs.numpy()
            explain = name == "test" and transform is None  # Grad-CAM grid of the worst confusions: once per run
            trained.metrics.update(metrics_and_artifacts(trained.probabilities[name + suffix], split.labels.numpy(),
                                                         split.classes, out_dir, name + suffix,
                                                         images=split.images.numpy(),
                                                         model=trained.model if explain else None))
    plot_curves(trained.history, out_dir / "curves.png")
    history = trained.history
    trained.metrics["train_images_per_s"] = sum(h["train_images_per_s"] for h in history) / len(history)
    trained.metrics["train_seconds"] = sum(h["epoch_seconds"] for h in history)
    return trained.metrics


def run(cfg: Config, out_dir: Path, on_epoch_end: Callable[[int, dict], None] | None = None,
        checkpoint_path: Path | None = None) -> Trained:
    """Prepare, train and evaluate one experiment; evaluation files go to out_dir."""
    trained = prepare(cfg)
    train(trained, on_epoch_end, checkpoint_path)
    evaluate(trained, out_dir)
    return trained
