"""Experiments as configuration: one Config, presets per entry point, and run(config) that ties the layers."""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import mlflow
import torch

from . import models, tracking
from .data import Split, load_splits
from .evaluation import metrics_and_artifacts, plot_curves
from .preprocess import Classifier, Preprocess, pixel_stats
from .training import TrainConfig, fit, predict

CHECKPOINT_ROOT = Path(".cnnlab") / "checkpoints"


@dataclass
class Config(TrainConfig):
    experiment: str = "fmnist_cnn"
    dataset: str = "fmnist"
    data_dir: str = ""
    model: str = "fmnist_cnn"
    classes: int = 3
    permute: bool = False
    permute_seed: int = 0
    variant: str = "model2"
    dropout: float = 0.5
    weights: str = "none"
    in_chans: int = 1
    small_input: bool = False
    width: int = 64
    image_size: int = 0  # 0: the dataset's own size
    freeze: str = "none"
    unfreeze_epochs: int = 0
    augment: str = "none"
    mixup: float = 0.0
    tta: str = "none"
    val_fraction: float = 0.1
    limit: int = 0
    on_bad: str = "error"
    test_split: str = "public"
    log_model: bool = True
    eval_test: bool = True  # False for tuning trials: the test split is evaluated once, on the study's final run
    run_name: str = ""

    def validate(self) -> None:
        super().validate()
        from .augment import AUGMENTS, TTA

        checks = [("experiment", self.experiment, PRESETS), ("model", self.model, models.names()),
                  ("freeze", self.freeze, models.FREEZE_STAGES), ("augment", self.augment, AUGMENTS),
                  ("tta", self.tta, TTA), ("in_chans", self.in_chans, (1, 3)), ("on_bad", self.on_bad, ("error", "skip"))]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.freeze != "none" and self.model != "resnet18":
            raise ValueError(f"freeze={self.freeze!r} applies to resnet18 only, not {self.model!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size and not 16 <= self.image_size <= 512:
            raise ValueError(f"image_size must be 0 (native) or 16..512, got {self.image_size}")

    def total_epochs(self) -> int:
        return self.epochs + (self.unfreeze_epochs if self.freeze != "none" else 0)

    def digest(self) -> str:
        """Hash of every setting that changes the result (not the run name or where the data lives)."""
        skip = ("run_name", "data_dir", "log_model", "eval_test", "device")
        keep = {k: v for k, v in asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


PRESETS: dict[str, dict] = {
    "fmnist_cnn": dict(dataset="fmnist", model="fmnist_cnn", epochs=10, batch_size=64, lr=1e-3, dropout=0.5),
    "fmnist_mlp": dict(dataset="fmnist", model="mlp", epochs=10, batch_size=64, lr=1e-3, dropout=0.2),
    "fer_cnn": dict(dataset="fer2013", model="fer_cnn", classes=7, variant="model2", dropout=0.3, lr=1e-3,
                    batch_size=32, optimizer="adam", epochs=15),
    "fer_resnet18": dict(dataset="fer2013", model="resnet18", classes=7, in_chans=3, image_size=48, weights="none",
                         dropout=0.0, lr=1e-3, batch_size=64, optimizer="adam", epochs=20),
    "fer_best": dict(dataset="fer2013", model="vgg_bn", classes=7, dropout=0.4, width=64, lr=0.05, batch_size=128,
                     optimizer="sgd", nesterov=True, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                     warmup_epochs=1.0, label_smoothing=0.1, augment="standard", tta="tencrop", epochs=60),
}


def make_config(experiment: str, **overrides) -> Config:
    if experiment not in PRESETS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in fields(Config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {experiment}; known: {sorted(known)}")
    return Config(**{**PRESETS[experiment], **overrides, "experiment": experiment})


def coerce(name: str, text: str):
    """Parse a command-line value to the type of Config field `name`; errors name the field and value."""
    types = {f.name: f.type for f in fields(Config)}
    if name not in types:
        raise ValueError(f"unknown parameter {name!r}; known: {sorted(types)}")
    kind = types[name]
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind == "int":
            value = float(text)  # MLproject float params arrive as "3.0"
            if not value.is_integer():
                raise ValueError
            return int(value)
        return {"float": float, "str": str}[kind](text)
    except ValueError:
        raise ValueError(f"parameter {name}={text!r} is not a valid {kind}") from None


def model_spec(cfg: Config, num_classes: int, image_size: int) -> dict:
    """The model factory's arguments, taken from the config by the factory's own parameter names."""
    params = inspect.signature(models._REGISTRY[cfg.model]).parameters
    values = {**asdict(cfg), "num_classes": num_classes, "image_size": image_size}
    return {"name": cfg.model, **{k: values[k] for k in params if k in values}}


def build(cfg: Config, train: Split) -> tuple[Classifier, dict]:
    torch.manual_seed(cfg.seed)  # initial weights depend on the seed alone
    image_size = cfg.image_size or train.images.shape[-1]
    mean, std = pixel_stats(train.images)
    spec = model_spec(cfg, len(train.classes), image_size)
    net = models.create(**spec)
    return Classifier(Preprocess(mean, std, image_size, cfg.in_chans), net), spec


def freeze_schedule(cfg: Config) -> Callable | None:
    if cfg.freeze == "none":
        return None

    def hook(epoch: int, model: Classifier) -> None:
        models.freeze_resnet(model.net, cfg.freeze if epoch < cfg.epochs else "none")
    return hook


def _checkpoint_dir(cfg: Config) -> Path:
    return CHECKPOINT_ROOT / f"{cfg.experiment}-{cfg.digest()}"


def _run_tags(cfg: Config, splits: dict[str, Split]) -> dict[str, str]:
    return {"experiment": cfg.experiment, "model": cfg.model, "dataset": cfg.dataset,
            "dataset_digest": splits["train"].digest, "config_digest": cfg.digest(), "seed": str(cfg.seed),
            **tracking.git_info()}


def evaluate_split(model: Classifier, split: Split, cfg: Config, out_dir: Path, prefix: str,
                   transform: Callable | None = None) -> dict[str, float]:
    probs = predict(model, split.images, cfg.eval_batch_size, cfg.device, cfg.precision, transform)
    return metrics_and_artifacts(probs.numpy(), split.labels.numpy(), split.classes, out_dir, prefix)


def run(cfg: Config, on_epoch_end: Callable[[int, dict], None] | None = None, nested: bool = False,
        run_id: str | None = None) -> dict:
    """Train, evaluate and log one experiment as one MLflow run; returns run id and final metrics.

    A checkpoint per epoch under .cnnlab/checkpoints: re-running the same config after a crash resumes
    the same MLflow run at the next epoch.
    """
    tracking.init_tracking(cfg.experiment)
    ckpt_dir = _checkpoint_dir(cfg)
    previous = None if nested else _interrupted_run(ckpt_dir)
    run_id = run_id or (None if nested else os.environ.get("MLFLOW_RUN_ID")) or previous
    name = cfg.run_name or f"{cfg.experiment}-{cfg.model}-s{cfg.seed}"
    with tracking.tracked_run(name, run_id=run_id, nested=nested, tags={"experiment": cfg.experiment}) as active:
        cfg.validate()
        if nested:  # a trial never resumes another trial's checkpoint
            ckpt_dir = CHECKPOINT_ROOT / f"run-{active.info.run_id}"
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "run_id").write_text(active.info.run_id)
        if previous and previous != active.info.run_id:
            _carry_over(ckpt_dir / "last.pt", previous)
        # `mlflow run` has already logged its entry-point params as typed on the command line: keep those
        logged = mlflow.get_run(active.info.run_id).data.params
        mlflow.log_params({k: v for k, v in asdict(cfg).items() if k not in logged})
        mlflow.log_dict(asdict(cfg), "config.json")
        splits = load_data(cfg)
        mlflow.set_tags(_run_tags(cfg, splits))
        for context, split in splits.items():
            tracking.log_split(split, context)
        mlflow.log_dict({"sizes": {k: len(s) for k, s in splits.items()}, "classes": splits["train"].classes,
                         **splits["train"].summary}, "data_summary.json")
        if cfg.permute:
            from .data.fmnist import permutation
            mlflow.log_dict({"seed": cfg.permute_seed, "permutation": permutation(cfg.permute_seed).tolist()},
                            "permutation.json")
        model, spec = build(cfg, splits["train"])
        mlflow.log_params({"preprocess_mean": model.preprocess.mean, "preprocess_std": model.preprocess.std,
                           "model_parameters": models.count_parameters(model)})

        def log_epoch(epoch: int, metrics: dict) -> None:
            mlflow.log_metrics(metrics, step=epoch + 1)
            if on_epoch_end:
                on_epoch_end(epoch, metrics)

        from .augment import batch_augment, tta_views
        train_cfg = dataclasses.replace(cfg, epochs=cfg.total_epochs())
        history = fit(model, splits["train"], splits["val"], train_cfg, augment=batch_augment(cfg),
                      epoch_hook=freeze_schedule(cfg), on_epoch_end=log_epoch, checkpoint=ckpt_dir / "last.pt")
        results = _final_evaluation(model, cfg, splits, history, tta_views(cfg.tta))
        if cfg.log_model:
            example = splits["test"].images[:2].numpy()
            tracking.log_model(model.cpu(), spec, splits["train"].classes, example)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        return {"run_id": active.info.run_id, **results}


def _interrupted_run(ckpt_dir: Path) -> str | None:
    """The run that an interrupted training of this config belongs to; a stale checkpoint is dropped."""
    path = ckpt_dir / "run_id"
    if not path.exists():
        return None
    run_id = path.read_text().strip()
    try:
        if mlflow.get_run(run_id).info.status != "FINISHED":
            return run_id
    except mlflow.exceptions.MlflowException:
        pass  # the run is gone (another tracking store): its checkpoint cannot be attributed
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return None


def _carry_over(checkpoint: Path, previous_run: str) -> None:
    """Resuming another run's checkpoint (under `mlflow run`): copy its epochs' metrics so this run is complete."""
    if not checkpoint.exists():
        return
    for epoch, metrics in enumerate(torch.load(checkpoint, weights_only=False)["history"]):
        mlflow.log_metrics(metrics, step=epoch + 1)
    mlflow.set_tag("resumed_from_run", previous_run)


def load_data(cfg: Config) -> dict[str, Split]:
    """The config's train / val / test splits; decoding is cached, so a second call is cheap."""
    return load_splits(cfg.dataset, cfg.data_dir or None, cfg.val_fraction, cfg.seed, cfg.limit, **_data_options(cfg))


def _data_options(cfg: Config) -> dict:
    if cfg.dataset == "fmnist":
        return {"classes": cfg.classes, "permute": cfg.permute, "permute_seed": cfg.permute_seed}
    return {"on_bad": cfg.on_bad, "test_split": cfg.test_split}


def _final_evaluation(model: Classifier, cfg: Config, splits: dict[str, Split], history: list[dict],
                      tta: Callable | None) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="cnnlab-eval-") as tmp:
        out = Path(tmp)
        results = {}
        for prefix in ("val", "test") if cfg.eval_test else ("val",):
            results.update(evaluate_split(model, splits[prefix], cfg, out, prefix))
            if tta is not None:
                results.update(evaluate_split(model, splits[prefix], cfg, out, f"{prefix}_tta", tta))
        plot_curves(history, out / "curves.png")
        results["train_images_per_s"] = sum(h["train_images_per_s"] for h in history) / len(history)
        results["train_seconds"] = sum(h["epoch_seconds"] for h in history)
        mlflow.log_metrics({k: v for k, v in results.items() if k not in history[-1]}, step=len(history))
        mlflow.log_artifacts(str(out), "evaluation")
    return results
