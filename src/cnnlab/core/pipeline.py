"""One experiment without MLflow: config -> data and model -> the one loop -> metrics, artifacts and probabilities,
plain and test-time augmented; ensembles of trained models evaluated the same way. experiments.run adds tracking
around it; the benchmarks call it directly."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from cnnlab.core import calibration, data, distributed, models
from cnnlab.core.augment import batch_augment, tta_views
from cnnlab.core.config import Config
from cnnlab.core.data import Split
from cnnlab.core.evaluation import metrics_and_artifacts, plot_curves
from cnnlab.core.preprocess import Classifier, Preprocess, pixel_stats
from cnnlab.core.training import EMA, Callback, Checkpoint, Distillation, Loop, fit, predict


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
    raw_model: Classifier | None = None  # with EMA: the trained weights, while `model` holds their average
    teacher: Classifier | None = None  # distillation's frozen teacher (one model or an ensemble)
    members: list[dict] = field(default_factory=list)  # an ensemble's member bundles (then `model` averages them)
    tags: dict[str, str] = field(default_factory=dict)  # where the model came from: final weights, teacher, members
    temperature: float | None = None  # fitted on val by evaluate(); stored in the bundle, applied when served

    @property
    def classes(self) -> list[str]:
        return self.splits["train"].classes

    def bundle(self) -> dict:
        """The model as a bundle: what is logged, registered and served."""
        data = (models.ensemble_bundle(self.members) if self.members
                else models.bundle(self.model, self.spec, self.classes))
        return data if self.temperature is None else {**data, "temperature": float(self.temperature)}


def load_data(cfg: Config) -> dict[str, Split]:
    """The config's train / val / test splits; decoding is cached, so a second call is cheap."""
    options = data.get(cfg.dataset).options_from(cfg)
    return data.load_splits(cfg.dataset, cfg.data_dir or None, cfg.val_fraction, cfg.data_seed(), cfg.limit,
                            **options)


def data_records(cfg: Config) -> dict[str, object]:
    """JSON files that describe the data beyond its digest (e.g. a pixel permutation), by file name."""
    dataset = data.get(cfg.dataset)
    return dataset.records(**dataset.options_from(cfg)) if dataset.records else {}


def model_spec(cfg: Config, num_classes: int, image_size: int) -> dict:
    """Every argument of the model factory: from the data and the config where they name it, else its default."""
    values = {**dataclasses.asdict(cfg), "num_classes": num_classes, "image_size": image_size}
    return {"name": cfg.model, **{k: values.get(k, v) for k, v in models.defaults(cfg.model).items()}}


def build(cfg: Config, train: Split) -> tuple[Classifier, dict]:
    """The network with its preprocessing (normalized by the training split's pixel statistics) and its spec."""
    torch.manual_seed(cfg.seed)  # initial weights depend on the seed alone
    image_size = cfg.image_size or train.images.shape[-1]
    mean, std = pixel_stats(train.images)
    spec = model_spec(cfg, len(train.classes), image_size)
    preprocess = Preprocess(mean, std, image_size, cfg.in_chans, image_channels=train.channels)
    return Classifier(preprocess, models.create(**spec)), spec


@dataclass
class FreezeSchedule(Callback):
    """ResNet stages up to `stage` frozen for the first `epochs` epochs, then everything trained."""
    stage: str
    epochs: int

    def on_epoch_start(self, loop: Loop, epoch: int) -> None:
        models.freeze_resnet(loop.model.net, self.stage if epoch < self.epochs else "none")


def checkpoint(cfg: Config, splits: dict[str, Split], path: Path) -> Checkpoint:
    """A checkpoint that only this config on this data resumes from."""
    spread = {"world_size": distributed.world_size(), "sync_bn": cfg.sync_bn} if distributed.world_size() > 1 else {}
    return Checkpoint(path, {"config_digest": cfg.digest(), "dataset_digest": splits["train"].digest, **spread})


def load_teacher(refs: list[str], load_bundle: Callable[[str], dict],
                 classes: list[str]) -> tuple[Classifier, dict[str, str]]:
    """The teacher that `refs` name (one model, or the ensemble of all of them) and tags that identify it."""
    data = models.ensemble_bundle([load_bundle(ref) for ref in refs])
    if data["classes"] != list(classes):
        raise ValueError(f"teacher {','.join(refs)} predicts classes {data['classes']}, the data has {classes}")
    members = data["members"]
    teacher = models.from_bundle(data if len(members) > 1 else members[0])
    return teacher, {"teacher_members": str(len(members)), "teacher_digest": models.bundle_digest(data),
                     "teacher_runs": ",".join(str(m.get("source", "?")) for m in members)}


def prepare(cfg: Config, load_bundle: Callable[[str], dict] = models.read_bundle) -> Trained:
    """Data, the network and (with cfg.teacher) the teacher, whose references `load_bundle` reads (default: files)."""
    cfg.validate()
    splits = load_data(cfg)
    model, spec = build(cfg, splits["train"])
    trained = Trained(cfg, splits, model, spec, tags={"final_weights": f"ema {cfg.ema}" if cfg.ema else "trained"})
    if cfg.teacher:
        trained.teacher, tags = load_teacher(cfg.teachers(), load_bundle, trained.classes)
        trained.tags.update(tags)
    return trained


def train(trained: Trained, callbacks: Sequence[Callback] = (), checkpoint_path: Path | None = None) -> list[dict]:
    """The loop over all epochs (with the unfreezing ones), the config's augmentation, EMA, teacher and freezing
    schedule, a checkpoint at checkpoint_path; `callbacks` run after these."""
    cfg, splits = trained.cfg, trained.splits
    if distributed.world_size() > 1 and cfg.freeze != "none":
        raise ValueError(f"freeze={cfg.freeze} changes which parameters train, which DistributedDataParallel fixes "
                         f"at the start: train it without torchrun")
    ema = EMA(trained.model, cfg.ema) if cfg.ema else None
    own = [distributed.Ranks(cfg.sync_bn) if distributed.world_size() > 1 else None,  # first: the others see DDP
           ema, Distillation(trained.teacher) if trained.teacher is not None else None,
           FreezeSchedule(cfg.freeze, cfg.epochs) if cfg.freeze != "none" else None,
           checkpoint(cfg, splits, checkpoint_path) if checkpoint_path else None]
    trained.history = fit(trained.model, splits["train"], splits.get("val"),
                          dataclasses.replace(cfg, epochs=cfg.total_epochs()),
                          augment=batch_augment(cfg, len(trained.classes)),
                          callbacks=[cb for cb in own if cb is not None] + list(callbacks))
    if ema is not None:  # the averaged weights are the result; the trained ones are evaluated beside them
        trained.raw_model, trained.model = trained.model, ema.module
    return trained.history


def evaluate(trained: Trained, out_dir: Path) -> dict[str, float]:
    """Metrics and artifact files (in out_dir) of val and test (test unless eval_test is off), each plain and with
    the config's TTA views; the probabilities stay in `trained`. With EMA also the trained weights' accuracies
    (*_accuracy_raw); after training, its throughput and time."""
    cfg = trained.cfg
    views = {"": None, "_tta": tta_views(cfg.tta)} if cfg.tta != "none" else {"": None}
    names = [n for n in ("val", "test") if n in trained.splits and (n == "val" or cfg.eval_test)]
    ensemble = isinstance(trained.model.net, models.MemberAverage)
    for name in names:
        for suffix, transform in views.items():
            probs = predict(trained.model, trained.splits[name].images, cfg.eval_batch_size, cfg.device,
                            cfg.precision, transform)
            trained.probabilities[name + suffix] = probs.numpy()
    if "val" in trained.probabilities:  # fitted on validation, applied to test and by the served model
        trained.temperature = calibration.fit_temperature(trained.probabilities["val"],
                                                          trained.splits["val"].labels.numpy())
        trained.metrics["temperature"] = trained.temperature
    for name in names:
        split = trained.splits[name]
        for suffix, transform in views.items():
            # Grad-CAM grid of the worst confusions: once per run, and not of an ensemble (no one feature map)
            explain = name == "test" and transform is None and not ensemble
            trained.metrics.update(metrics_and_artifacts(trained.probabilities[name + suffix], split.labels.numpy(),
                                                         split.classes, out_dir, name + suffix,
                                                         images=split.images.numpy(), temperature=trained.temperature,
                                                         model=trained.model if explain else None))
            if trained.raw_model is not None:
                raw = predict(trained.raw_model, split.images, cfg.eval_batch_size, cfg.device, cfg.precision,
                              transform)
                trained.metrics[f"{name}{suffix}_accuracy_raw"] = (raw.argmax(1) == split.labels).float().mean().item()
    if trained.history:
        plot_curves(trained.history, out_dir / "curves.png")
        history = trained.history
        trained.metrics["train_images_per_s"] = sum(h["train_images_per_s"] for h in history) / len(history)
        trained.metrics["train_seconds"] = sum(h["epoch_seconds"] for h in history)
    return trained.metrics


def ensemble(member_bundles: list[dict], cfg: Config) -> Trained:
    """Several trained models as one (their probabilities averaged), on the data `cfg` describes, ready to evaluate."""
    cfg.validate()
    splits = load_data(cfg)
    data = models.ensemble_bundle(member_bundles)
    if data["classes"] != splits["train"].classes:
        raise ValueError(f"the ensemble predicts classes {data['classes']}, the data has {splits['train'].classes}")
    members = data["members"]
    return Trained(cfg, splits, models.from_bundle(data), data["spec"], members=members,
                   tags={"members": ",".join(str(m.get("source", "?")) for m in members),
                         "members_digest": models.bundle_digest(data)})


